"""Checking a file's entries against the target model before anything is changed.

Everything a file can set is checked here, on the host, before :mod:`resu.io.apply` mutates the
model: the JSON entry of every ResuParameter (fields, shape, dtype, layout), its inner tensors
(presence, dtype, shape, the mask's contents, the SPARSE zeros) and every plain tensor's shape and
dtype. Each problem raises a ValueError naming the file, the parameter and the field.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from resu.io.format import dtype_name, inner_key, parse_dtype
from resu.tensors.layout import ResuLayout
from resu.tensors.mask import SparseMask
from resu.tensors.mode import ResuMode

# The library's own load-time validation of a layout (raises CheckpointError, a ValueError). Called at
# one place, the end of check_inner; until resu.tensors.validate exists the checks above stand alone.
try:
    from resu.tensors.validate import validate_layout
except ModuleNotFoundError as _err:
    if _err.name != "resu.tensors.validate":
        raise
    validate_layout = None

_ENTRY_FIELDS = {"shape", "dtype", "layout"}
_LAYOUT_FIELDS = {"mode", "encoding", "n_pruned", "qformat", "layout_id", "selective", "write_policy"}


class ResuEntry(NamedTuple):
    """A checked ResuParameter from a file: its layout and inner tensors (still on the file's device)."""

    name: str
    layout: ResuLayout
    shape: torch.Size
    inner: dict[str, torch.Tensor]


def fail(source: str, name: str, field: str, problem: str) -> ValueError:
    return ValueError(f"{source}: parameter `{name}`, field `{field}`: {problem}; the model is unchanged")


def parse_layout(source: str, name: str, data: Any) -> ResuLayout:
    """The :class:`ResuLayout` of a JSON entry (known fields only, known mode, encoding and quant format)."""
    if not isinstance(data, dict):
        raise fail(source, name, "layout", f"must be a JSON object, found {type(data).__name__}")
    unknown = sorted(set(data) - _LAYOUT_FIELDS)
    if unknown:
        raise fail(source, name, "layout", f"unknown fields {unknown}")
    if "mode" not in data:
        raise fail(source, name, "layout.mode", "is missing")
    layout_id = data.get("layout_id")
    if layout_id is not None and (isinstance(layout_id, bool) or not isinstance(layout_id, int)):
        raise fail(source, name, "layout.layout_id", f"must be an int, found {layout_id!r}")
    n_pruned = data.get("n_pruned", 0)
    if isinstance(n_pruned, bool) or not isinstance(n_pruned, int):
        raise fail(source, name, "layout.n_pruned", f"must be an int, found {n_pruned!r}")
    try:
        return ResuLayout.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise fail(source, name, "layout", f"is not a valid resu layout ({err})") from None


def check_entry_header(source: str, name: str, entry: dict, target: torch.Tensor) -> tuple[ResuLayout, torch.Size]:
    """Fields, shape and dtype of a ResuParameter's JSON entry against the model's parameter ``target``."""
    unknown, missing = sorted(set(entry) - _ENTRY_FIELDS), sorted(_ENTRY_FIELDS - set(entry))
    if unknown or missing:
        raise fail(source, name, "params", f"entry must hold {sorted(_ENTRY_FIELDS)}: unknown {unknown}, missing {missing}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise fail(source, name, "shape", f"must be a list of non-negative ints, found {shape!r}")
    if tuple(shape) != tuple(target.shape):
        raise fail(source, name, "shape", f"is {tuple(shape)} in the file but {tuple(target.shape)} in the model")
    dtype = parse_dtype(entry["dtype"], f"{source}: parameter `{name}`")
    if dtype != target.dtype:
        raise fail(source, name, "dtype", f"is {dtype_name(dtype)} in the file but {dtype_name(target.dtype)} in the "
                   "model; cast the model with .to(dtype) before loading")
    layout = parse_layout(source, name, entry["layout"])
    if layout.mode is ResuMode.QRESU and len(shape) < 2:
        raise fail(source, name, "layout.mode", "QRESU needs a weight of at least 2 dimensions")
    if layout.mode.has_mask and not 0 <= layout.n_pruned <= math.prod(shape):
        raise fail(source, name, "layout.n_pruned", f"must lie in [0, {math.prod(shape)}], found {layout.n_pruned}")
    return layout, torch.Size(shape)


def _need(source, name, field, t: torch.Tensor, *, shape=None, dtype=None, floating=False) -> None:
    if dtype is not None and t.dtype != dtype:
        raise fail(source, name, field, f"must have dtype {dtype_name(dtype)}, found {dtype_name(t.dtype)}")
    if floating and not t.is_floating_point():
        raise fail(source, name, field, f"must be floating-point, found {dtype_name(t.dtype)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise fail(source, name, field, f"must have shape {tuple(shape)}, found {tuple(t.shape)}")


def check_inner(source: str, name: str, layout: ResuLayout, shape: torch.Size, dtype: torch.dtype,
                tensors: dict[str, torch.Tensor]) -> ResuEntry:
    """The inner tensors ``layout`` needs, taken from ``tensors`` (file keys) and checked one by one."""
    inner = {}
    for attr in layout.inner_names:
        key = inner_key(name, attr)
        if key not in tensors:
            raise fail(source, name, attr.lstrip("_"), f"tensor `{key}` is missing from the file ({layout.mode.value} mode)")
        inner[attr] = tensors[key]
    numel = math.prod(shape)
    if layout.mode.has_mask:
        storage = inner["_mask_storage"]
        try:  # length, dtype and contents (index range and order, bitmap popcount and padding)
            SparseMask.from_storage(storage, layout.encoding, tuple(shape), layout.n_pruned, validate=True)
        except ValueError as err:
            raise fail(source, name, "mask_storage", f"does not encode n_pruned={layout.n_pruned} pruned slots "
                       f"as {layout.encoding_name} ({err})") from None
    if layout.mode is ResuMode.QRESU:
        fmt = layout.qformat
        rows, cols = shape[0], numel // max(shape[0], 1)
        _need(source, name, "qdata", inner["_qdata"], shape=((numel + 1) // 2 if fmt.bits == 4 else numel,),
              dtype=torch.uint8)
        _need(source, name, "qscale", inner["_qscale"], shape=fmt.scale_shape(rows, cols), dtype=fmt.scale_dtype,
              floating=fmt.scale_dtype is None)
        _need(source, name, "qzero", inner["_qzero"], shape=fmt.zero_shape(rows, cols), floating=True)
        _need(source, name, "theta", inner["_theta"], shape=(layout.n_pruned,), dtype=dtype)
    else:
        weight = inner["_weight"]
        _need(source, name, "weight", weight, shape=shape, dtype=dtype)
        if layout.mode is ResuMode.SPARSE:
            mask = SparseMask.from_storage(inner["_mask_storage"], layout.encoding, tuple(shape), layout.n_pruned)
            if bool((mask.get_pruned(weight) != 0).any()):
                raise fail(source, name, "weight", "must be exactly zero at every pruned slot in sparse mode")
    if validate_layout is not None:  # the one call to the shared validator
        validate_layout(name, shape=tuple(shape), mode=layout.mode, encoding=layout.encoding, n_pruned=layout.n_pruned,
                        quant_format=layout.qformat, tensors=inner)
    return ResuEntry(name, layout, shape, inner)


def check_plain(source: str, key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    """A plain parameter or buffer: same shape and dtype as the model's."""
    if tuple(value.shape) != tuple(target.shape):
        raise fail(source, key, "shape", f"is {tuple(value.shape)} in the file but {tuple(target.shape)} in the model")
    if value.dtype != target.dtype:
        raise fail(source, key, "dtype", f"is {dtype_name(value.dtype)} in the file but {dtype_name(target.dtype)} "
                   "in the model")
