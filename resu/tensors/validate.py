"""Validation of a ResuParameter's data when it enters from outside (a checkpoint, a pickle, a file).

The kernels trust lengths. A bitmap with one bit too many makes the bitmap kernels write one slot past
θ's Adam states; a θ one element short makes ``dequant_merge`` read past θ's end. On a GPU that is
silent memory corruption, so everything a checkpoint can set is checked once, when it is loaded:
:func:`validate_layout` checks a ResuParameter's metadata (mode, shape, mask encoding, ``n_pruned``,
quantization format) against its inner tensors (dtypes, shapes, devices, contiguity) and the mask's
contents (index range, order and uniqueness; bitmap popcount and padding); in SPARSE mode, that the
pruned slots of the weight hold zero. O(numel), a handful of host syncs: call it once per load.

The optimizer's states are checked by :mod:`resu.optim.state_checks`, kernel launches by
:mod:`resu.compile.launch_checks`. Every check raises a :class:`CheckpointError` (a ``ValueError``)
naming the parameter, the field, what was expected, what was found and the fix, before anything is
changed: the functions here only read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from resu.tensors.mask_kernels import MAX_NUMEL, MaskEncoding, _storage_dtype, _storage_len
from resu.tensors.layout import INNER_TENSORS
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import BITS, SCHEMES, QuantFormat

__all__ = [
    "CheckpointError",
    "INNER_TENSORS",
    "validate_layout",
    "validate_parameter",
    "validate_resu_layout",
]

_ALL_INNER = frozenset(n for names in INNER_TENSORS.values() for n in names)

_CHECKPOINT_FIX = (
    "the data is corrupt or was not written by resu: load a trusted copy, or re-save it from the model "
    "(model.state_dict() / optimizer.state_dict())"
)


class CheckpointError(ValueError):
    """Data for parameter ``name`` is invalid in ``field``; nothing was changed."""

    def __init__(self, name: str, field: str, expected: str, found: Any, fix: str = _CHECKPOINT_FIX):
        self.name = name
        self.field = field
        super().__init__(f"{name}: `{field}` must be {expected}, found {found}; {fix}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(t: Any) -> str:
    """What was found, briefly (containers by type only: they may be large)."""
    if isinstance(t, torch.Tensor):
        return f"{type(t).__name__} of shape {tuple(t.shape)}, {t.dtype}, on {t.device}"
    if isinstance(t, (list, tuple, dict, set)):
        return f"a {type(t).__name__}"
    return f"a {type(t).__name__} ({t!r})"


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------


def _as_mode(name: str, mode: Any) -> ResuMode:
    try:
        return ResuMode(mode)
    except (ValueError, TypeError):
        choices = ", ".join(repr(m.value) for m in ResuMode)
        raise CheckpointError(name, "mode", f"one of {choices}", repr(mode)) from None


def _as_encoding(name: str, encoding: Any) -> MaskEncoding:
    try:
        return MaskEncoding(encoding)
    except (ValueError, TypeError):
        choices = ", ".join(repr(e.value) for e in MaskEncoding)
        raise CheckpointError(name, "encoding", f"one of {choices}", repr(encoding)) from None


def _as_shape(name: str, shape: Any, mode: ResuMode) -> tuple[int, ...]:
    ok = isinstance(shape, (torch.Size, tuple, list)) and all(_is_int(d) and d >= 0 for d in shape)
    if not ok:
        raise CheckpointError(name, "shape", "a tuple of non-negative ints", repr(shape))
    shape = tuple(shape)
    if mode.has_mask and math.prod(shape) > MAX_NUMEL:
        raise CheckpointError(
            name, "shape", f"at most {MAX_NUMEL} elements (mask indices are int32)", f"{math.prod(shape)} elements"
        )
    if mode is ResuMode.QRESU and len(shape) < 2:
        # Quantization lays its scales out per row of the 2-D view (rows = shape[0]); a 1-D weight's
        # scale layout and the kernels' indexing disagree, so the library cannot use one.
        raise CheckpointError(name, "shape", "at least 2-D in QRESU mode (rows × columns)", f"{shape}")
    return shape


def _check_format(name: str, fmt: Any) -> QuantFormat:
    if not isinstance(fmt, QuantFormat):
        raise CheckpointError(name, "quant_format", "a resu QuantFormat in QRESU mode", _describe(fmt))
    # QuantFormat's own check accepts 4.0 (4.0 in (4, 8)); the kernels need an int.
    if not (_is_int(fmt.bits) and fmt.bits in BITS):
        raise CheckpointError(name, "quant_format.bits", "the int 4 or 8", repr(fmt.bits))
    if not (isinstance(fmt.scheme, str) and fmt.scheme in SCHEMES):
        raise CheckpointError(name, "quant_format.scheme", f"one of {', '.join(map(repr, SCHEMES))}", repr(fmt.scheme))
    if not (_is_int(fmt.group_size) and fmt.group_size > 0):
        raise CheckpointError(name, "quant_format.group_size", "a positive int", repr(fmt.group_size))
    if fmt.bits not in fmt.spec.bits:
        raise CheckpointError(name, "quant_format.bits", f"one of {fmt.spec.bits} for scheme {fmt.scheme!r}", repr(fmt.bits))
    if not isinstance(fmt.double_quant, bool) or (fmt.double_quant and not fmt.spec.double_quant_ok):
        raise CheckpointError(name, "quant_format.double_quant", f"a bool, False for scheme {fmt.scheme!r}",
                              repr(fmt.double_quant))
    return fmt


def _present_tensors(name: str, mode: ResuMode, tensors: Any) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise CheckpointError(name, "tensors", "a mapping of inner tensor names to tensors", _describe(tensors))
    present = {k: v for k, v in tensors.items() if v is not None}
    unknown = sorted(str(k) for k in present if k not in _ALL_INNER)
    if unknown:
        raise CheckpointError(name, "tensors", f"inner tensors among {sorted(_ALL_INNER)}", f"unknown {unknown}")
    need = INNER_TENSORS[mode]
    missing = [k for k in need if k not in present]
    extra = sorted(k for k in present if k not in need)
    if missing or extra:
        raise CheckpointError(
            name, "tensors", f"exactly {list(need)} in {mode.value} mode",
            f"missing {missing}, unexpected {extra}",
        )
    for key, t in present.items():
        # A nested subclass (a ResuParameter as a weight, say) would bypass every check below.
        if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(name, key, "a plain torch.Tensor", _describe(t))
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        found = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise CheckpointError(name, "tensors", "on one device", found)
    return present


def _check_tensor(
    name: str,
    field: str,
    t: torch.Tensor,
    *,
    shape: Optional[tuple[int, ...]] = None,
    dtype: Optional[torch.dtype] = None,
    floating: bool = False,
) -> None:
    """Dtype, exact shape and contiguity of one inner tensor (metadata only)."""
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(name, f"{field}.dtype", str(dtype), str(t.dtype))
    if floating and not t.is_floating_point():
        raise CheckpointError(name, f"{field}.dtype", "a floating-point dtype", str(t.dtype))
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(name, f"{field}.shape", str(tuple(shape)), str(tuple(t.shape)))
    if not t.is_contiguous():
        # Every producer in the library writes contiguous tensors, and the kernels take raw pointers.
        raise CheckpointError(name, field, "contiguous", f"strides {t.stride()}")


# --------------------------------------------------------------------------
# Contents (data-dependent: a few host syncs)
# --------------------------------------------------------------------------

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _check_index_contents(name: str, storage: torch.Tensor, enc: MaskEncoding, numel: int) -> None:
    if storage.numel() == 0:
        return
    idx = storage.to(torch.int64)
    step_ok = (idx[1:] > idx[:-1]).all() if idx.numel() > 1 else torch.ones((), dtype=torch.bool, device=idx.device)
    lo, hi, increasing = torch.stack([idx.min(), idx.max(), step_ok.to(torch.int64)]).tolist()
    field = f"_mask_storage ({enc.value})"
    if lo < 0 or hi >= numel:
        raise CheckpointError(name, field, f"flat indices in [0, {numel})", f"values in [{lo}, {hi}]")
    if not increasing:
        at = int((idx[1:] <= idx[:-1]).nonzero()[0, 0])
        a, b = idx[at].item(), idx[at + 1].item()
        what = "a duplicated index" if a == b else "unsorted indices"
        raise CheckpointError(
            name, field, "strictly increasing (sorted, unique) flat indices", f"{what}: {a} then {b} at position {at}"
        )


def _check_bitmap_contents(name: str, storage: torch.Tensor, numel: int, n_pruned: int) -> None:
    field = "_mask_storage (bitmap)"
    tail = numel % 8
    if tail and storage.numel():
        last = int(storage[-1])
        if last >> tail:
            raise CheckpointError(
                name, field, f"zero in the {8 - tail} padding bits past numel={numel}", f"last byte {last:#04x}"
            )
    count = int(_POPCOUNT.to(storage.device)[storage.to(torch.int64)].sum()) if storage.numel() else 0
    if count != n_pruned:
        raise CheckpointError(name, field, f"a bitmap with n_pruned={n_pruned} set bits", f"{count} set bits")


def _pruned_flags(storage: torch.Tensor, enc: MaskEncoding, numel: int) -> torch.Tensor:
    """Flat bool (True = pruned) of a mask whose storage has already been validated."""
    if enc is MaskEncoding.BITMAP:
        bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=storage.device)
        return (storage.unsqueeze(1) & bits).ne(0).reshape(-1)[:numel]
    listed = torch.zeros(numel, dtype=torch.bool, device=storage.device)
    listed[storage.to(torch.int64)] = True
    return listed if enc is MaskEncoding.PRUNED_INDICES else ~listed


def _check_pruned_zero(name: str, weight: torch.Tensor, storage: torch.Tensor, enc: MaskEncoding, numel: int) -> None:
    """SPARSE invariant. Refused rather than re-zeroed: non-zero pruned slots mean the data is not what its
    metadata says (RESU values labelled SPARSE, say), and zeroing would silently drop them."""
    bad = (weight.reshape(-1) != 0) & _pruned_flags(storage, enc, numel)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0, 0])
        raise CheckpointError(
            name, "_weight", "exactly zero at every pruned slot in sparse mode",
            f"{count} non-zero pruned slot(s), the first at flat index {first}",
        )


# --------------------------------------------------------------------------
# ResuParameter layout
# --------------------------------------------------------------------------


def validate_layout(
    name: str,
    *,
    shape: Sequence[int],
    mode: Union[ResuMode, str],
    encoding: Optional[Union[MaskEncoding, str]],
    n_pruned: int,
    quant_format: Optional[QuantFormat],
    tensors: Mapping[str, Optional[torch.Tensor]],
) -> None:
    """Check that a ResuParameter's metadata and inner tensors describe a layout the library can run.

    Args:
        name: the parameter's name, used in error messages (``"fc1.weight"``).
        shape: its outer shape.
        mode: a :class:`ResuMode` or its value.
        encoding: the mask encoding (a :class:`MaskEncoding` or its value); None in DENSE mode.
        n_pruned: number of pruned slots (an int; 0 in DENSE mode).
        quant_format: the :class:`QuantFormat` in QRESU mode, else None.
        tensors: the inner tensors by name (``__tensor_flatten__`` names: ``_weight``, ``_mask_storage``,
            ``_qdata``, ``_qscale``, ``_qzero``, ``_theta``); absent ones may be missing or None.

    Any mask encoding is accepted when its storage is consistent, not only the one
    :func:`~resu.tensors.mask.choose_encoding` would pick: every kernel computes correctly with all
    three. Content checks are skipped on the ``meta`` device (there is no data to run on).

    Raises:
        CheckpointError: naming ``name``, the field, what was expected and what was found.
    """
    mode = _as_mode(name, mode)
    shape = _as_shape(name, shape, mode)
    numel = math.prod(shape)
    present = _present_tensors(name, mode, tensors)

    enc = None
    if mode.has_mask:
        enc = _as_encoding(name, encoding)
        if not (_is_int(n_pruned) and 0 <= n_pruned <= numel):
            raise CheckpointError(name, "n_pruned", f"an int in [0, numel={numel}]", repr(n_pruned))
        storage = present["_mask_storage"]
        length = _storage_len(enc, numel, n_pruned)
        _check_tensor(name, "_mask_storage", storage, shape=(length,), dtype=_storage_dtype(enc))
    else:
        if encoding is not None:
            raise CheckpointError(name, "encoding", "None in dense mode (there is no mask)", repr(encoding))
        if not (_is_int(n_pruned) and n_pruned == 0):
            raise CheckpointError(name, "n_pruned", "0 in dense mode", repr(n_pruned))

    if mode is ResuMode.QRESU:
        fmt = _check_format(name, quant_format)
        rows = shape[0]
        cols = numel // max(rows, 1)
        _check_tensor(name, "_qdata", present["_qdata"], shape=(fmt.packed_numel(numel),), dtype=torch.uint8)
        _check_tensor(name, "_qscale", present["_qscale"], shape=fmt.scale_shape(rows, cols), dtype=fmt.scale_dtype,
                      floating=fmt.scale_dtype is None)
        _check_tensor(name, "_qzero", present["_qzero"], shape=fmt.zero_shape(rows, cols), floating=True)
        _check_tensor(name, "_theta", present["_theta"], shape=(n_pruned,), floating=True)
    else:
        if quant_format is not None:
            raise CheckpointError(name, "quant_format", f"None in {mode.value} mode", repr(quant_format))
        _check_tensor(name, "_weight", present["_weight"], shape=shape, floating=True)

    if not mode.has_mask or storage.device.type == "meta":
        return
    if enc is MaskEncoding.BITMAP:
        _check_bitmap_contents(name, storage, numel, n_pruned)
    else:
        _check_index_contents(name, storage, enc, numel)
    if mode is ResuMode.SPARSE:
        _check_pruned_zero(name, present["_weight"], storage, enc, numel)


def validate_resu_layout(name: str, layout: Any, shape: Sequence[int], tensors: Mapping[str, Any]) -> None:
    """:func:`validate_layout` for a :class:`~resu.tensors.layout.ResuLayout` spec and its inner tensors
    (what ``__tensor_flatten__`` gives). Untrusted loaders call it before building a ResuParameter."""
    validate_layout(
        name, shape=shape, mode=layout.mode, encoding=layout.encoding, n_pruned=layout.n_pruned,
        quant_format=layout.qformat, tensors=tensors,
    )


def validate_parameter(name: str, p: torch.Tensor) -> None:
    """:func:`validate_layout` of an existing ResuParameter ``p`` (one read from a checkpoint, say)."""
    names, layout = p.__tensor_flatten__()
    validate_resu_layout(name, layout, tuple(p.shape), {k: getattr(p, k) for k in names})
