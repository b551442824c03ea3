"""Validation of data that enters from outside: a ResuParameter's layout, an optimizer state, a kernel launch.

The kernels trust lengths. A bitmap with one bit too many makes the bitmap kernels write one slot past
θ's Adam states; a θ one element short makes ``dequant_merge`` read past θ's end. On a GPU that is
silent memory corruption, so everything a checkpoint can set is checked once, when it is loaded:

- :func:`validate_layout`: a ResuParameter's metadata (mode, shape, mask encoding, ``n_pruned``,
  quantization format) against its inner tensors (dtypes, shapes, devices, contiguity) and the mask's
  contents (index range, order and uniqueness; bitmap popcount and padding); in SPARSE mode, that the
  pruned slots of the weight hold zero. O(numel), a handful of host syncs: call it once per load.
- :func:`check_optimizer_state`: one ``ResuAdamW`` state entry (Adam moments, step counter,
  RESU-Selective buffers and subset indices) against the slots it belongs to.
- ``check_launch_*``: what each Triton launcher relies on, from tensor metadata only (``numel``,
  ``dtype``, ``device``, contiguity): no device sync, so they can run before every launch. They check
  lengths; the contents a length check cannot see (popcounts, index values) are what
  :func:`validate_layout` and :func:`check_optimizer_state` guarantee at load time.

Every check raises a :class:`CheckpointError` (a ``ValueError``) naming the parameter, the field, what
was expected, what was found and the fix, before anything is changed: the functions here only read.

This module depends on the mask, mode and quantization definitions only; it mirrors (and its tests
compare against) the optimizer's state layout rather than importing the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

if TYPE_CHECKING:  # the optimizer package imports the tensors package: imported lazily at run time
    from resu.core.selective import SelectionConfig
from resu.tensors.mask_kernels import MAX_NUMEL, MaskEncoding, _storage_dtype, _storage_len
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import BITS, SCHEMES, QuantFormat

__all__ = [
    "CheckpointError",
    "INNER_TENSORS",
    "check_launch_adamw_bitmap",
    "check_launch_bitmap_key_adamw",
    "check_launch_consistency_pass",
    "check_launch_dequant_merge",
    "check_launch_gather_bitmap",
    "check_launch_indexed_adamw",
    "check_launch_theta_adamw",
    "check_optimizer_state",
    "validate_layout",
    "validate_parameter",
    "validate_resu_layout",
]

#: The inner tensors a ResuParameter holds in each mode (``__tensor_flatten__`` names).
INNER_TENSORS: dict[ResuMode, tuple[str, ...]] = {
    ResuMode.DENSE: ("_weight",),
    ResuMode.SPARSE: ("_weight", "_mask_storage"),
    ResuMode.RESU: ("_weight", "_mask_storage"),
    ResuMode.QRESU: ("_qdata", "_qscale", "_qzero", "_theta", "_mask_storage"),
}
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
        scale_shape = fmt.scale_shape(rows, cols)
        _check_tensor(name, "_qscale", present["_qscale"], shape=scale_shape, floating=True)
        _check_tensor(name, "_qzero", present["_qzero"], shape=scale_shape, floating=True)
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


# --------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------

_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_EMA_KEYS = ("selection_m", "selection_v")


def _selection_layout(config: SelectionConfig, n_slots: int) -> tuple[tuple[int, int], int]:
    """``(tag, Adam state length)`` of a selective weight, as ``resu.optim.selective.state_layout``."""
    from resu.core.selective import STRATEGIES

    code = STRATEGIES.index(config.strategy)
    if config.is_static:
        k = config.select_count(n_slots)
        return (code, k), k
    return (code, 0), n_slots


def _as_tag(tag: Any) -> Optional[tuple]:
    return tuple(tag) if isinstance(tag, (tuple, list)) else tag


def _scalar_value(name: str, field: str, t: Any, *, integral_dtype: bool) -> float:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise CheckpointError(name, field, "a one-element tensor", _describe(t))
    if integral_dtype and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise CheckpointError(name, f"{field}.dtype", "an integer dtype", str(t.dtype))
    if not integral_dtype and (t.is_complex() or t.dtype == torch.bool):
        raise CheckpointError(name, f"{field}.dtype", "a real dtype", str(t.dtype))
    return t.item()  # a host counter in ResuAdamW states; at most one sync, once per load


def _check_state_tensor(name, field, t, length_or_shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointError(name, field, "a plain tensor", _describe(t))
    if not t.is_floating_point():
        raise CheckpointError(name, f"{field}.dtype", "a floating-point dtype", str(t.dtype))
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(name, f"{field}.dtype", str(dtype), str(t.dtype))
    if device is not None and t.device != torch.device(device):
        raise CheckpointError(name, f"{field}.device", str(device), str(t.device))
    if length_or_shape is not None:
        want = (length_or_shape,) if _is_int(length_or_shape) else tuple(length_or_shape)
        if tuple(t.shape) != want:
            raise CheckpointError(name, f"{field}.shape", f"{want} (one entry per trainable slot)", str(tuple(t.shape)))
    if not t.is_contiguous():
        raise CheckpointError(name, field, "contiguous (the kernels take raw pointers)", f"strides {t.stride()}")


def _check_index_vector(name, field, t, length, bound) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise CheckpointError(name, field, "an int64 tensor", _describe(t))
    if tuple(t.shape) != (length,):
        raise CheckpointError(name, f"{field}.shape", f"({length},)", str(tuple(t.shape)))
    if not t.is_contiguous():
        raise CheckpointError(name, field, "contiguous", f"strides {t.stride()}")
    if length:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= bound:
            raise CheckpointError(name, field, f"indices in [0, {bound})", f"values in [{lo}, {hi}]")
        if length > 1 and not bool((t[1:] > t[:-1]).all()):
            raise CheckpointError(name, field, "strictly increasing (sorted, unique) indices", "unsorted or duplicated")
    return t


def check_optimizer_state(
    name: str,
    state: Mapping[str, Any],
    n_slots: Union[int, Sequence[int]],
    dtype: Optional[torch.dtype],
    *,
    device: Optional[Union[torch.device, str]] = None,
    selective: Optional["SelectionConfig"] = None,
    theta_positions: Optional[torch.Tensor] = None,
) -> None:
    """Check one ``ResuAdamW`` state entry against the slots it trains.

    Call it for a state the optimizer will use as it is: one whose ``layout_id`` equals the parameter's
    (``ResuAdamW`` restarts a state of another layout from zero, resizing its buffers). Before
    ``Optimizer.load_state_dict`` casts states, pass ``dtype=None``/``device=None`` (any floating dtype,
    any device); after, the parameter's.

    Args:
        name: the parameter's name, for messages.
        state: the entry (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``layout_id``,
            ``selection`` and the RESU-Selective buffers).
        n_slots: trainable slots of the parameter: an int (SPARSE: active slots; RESU/QRESU: ``n_pruned``),
            or the weight's shape when every slot trains (DENSE, plain parameters).
        dtype: the dtype the moments must have, or None for any floating dtype.
        device: the device the moments must be on, or None.
        selective: the :class:`SelectionConfig` applied to this weight, or None.
        theta_positions: static selective strategies on a RESU weight: the flat positions of its θ slots
            in the weight (ascending pruned indices), to check ``subset_positions``; None when θ is its own
            vector (QRESU), where the positions are the subset itself.

    Raises:
        CheckpointError: naming ``name`` and the state key.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(name, "state", "a mapping", _describe(state))
    if len(state) == 0:
        return  # a fresh state: the optimizer builds it on the first step
    if not (_is_int(n_slots) and n_slots >= 0) and not (
        isinstance(n_slots, (tuple, list, torch.Size)) and all(_is_int(d) and d >= 0 for d in n_slots)
    ):
        raise ValueError(f"check_optimizer_state: `n_slots` must be an int >= 0 or a shape, got {n_slots!r}")

    step = _scalar_value(name, "step", state.get("step"), integral_dtype=False)
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise CheckpointError(name, "step", "a finite whole number >= 0", repr(step))
    if "layout_id" in state and not _is_int(state["layout_id"]):
        raise CheckpointError(name, "layout_id", "an int", repr(state["layout_id"]))
    tag = _as_tag(state.get("selection"))
    if tag is not None and not (len(tag) == 2 and all(_is_int(x) for x in tag)):
        raise CheckpointError(name, "selection", "None or a pair of ints (strategy, k)", repr(state.get("selection")))
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            raise CheckpointError(name, key, "present in a non-empty state", "missing")

    # Which layout the optimizer will read the buffers with; any other tag makes it restart them.
    if selective is None:
        expected_tag, length = None, n_slots
    else:
        if not _is_int(n_slots):
            raise ValueError("check_optimizer_state: selective states need `n_slots` as an int (θ slots)")
        expected_tag, length = _selection_layout(selective, n_slots)
    reused = tag == expected_tag
    for key in _ADAM_KEYS:
        if key in state:
            _check_state_tensor(name, key, state[key], length if reused else None, dtype, device)
    if not reused or selective is None:
        return

    if not selective.is_static:
        for key in _EMA_KEYS:
            if key in state:
                _check_state_tensor(name, key, state[key], n_slots, dtype, device)
        return
    if "subset" not in state:
        return  # chosen afresh at the next step
    k = length
    subset = _check_index_vector(name, "subset", state["subset"], k, n_slots)
    positions = state.get("subset_positions")
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64 or tuple(positions.shape) != (k,):
        raise CheckpointError(name, "subset_positions", f"an int64 tensor of shape ({k},)", _describe(positions))
    if theta_positions is None:
        expected = subset  # θ is its own vector: a slot's position is its θ index
    else:
        if theta_positions.numel() != n_slots:
            raise ValueError(f"check_optimizer_state: `theta_positions` must have n_slots={n_slots} entries")
        expected = theta_positions.to(subset.device, torch.int64).index_select(0, subset)
    if not positions.is_contiguous() or not torch.equal(positions.to(expected.device), expected):
        raise CheckpointError(
            name, "subset_positions", "the contiguous flat positions of the `subset` θ slots", "other positions"
        )
    if "subset_choices" in state:
        choices = _scalar_value(name, "subset_choices", state["subset_choices"], integral_dtype=True)
        if choices < 0:
            raise CheckpointError(name, "subset_choices", "an int >= 0", repr(choices))
    if "subset_seed" in state:
        seed = _scalar_value(name, "subset_seed", state["subset_seed"], integral_dtype=True)
        if not 0 <= seed < 2**62:
            raise CheckpointError(name, "subset_seed", "an int in [0, 2**62)", repr(seed))


# --------------------------------------------------------------------------
# Kernel launches (metadata only: no device sync)
# --------------------------------------------------------------------------


def _launch_error(launcher: str, arg: str, expected: str, found: Any) -> ValueError:
    return ValueError(
        f"{launcher}: `{arg}` must be {expected}, got {found}; the caller passed a layout that does not match "
        "the mask (validate checkpoints with resu.tensors.validate.validate_layout when loading them)"
    )


def _need(launcher, arg, t, *, numel=None, dtype=None, floating=False, device=None):
    if not isinstance(t, torch.Tensor):
        raise _launch_error(launcher, arg, "a tensor", type(t).__name__)
    if numel is not None and t.numel() != numel:
        raise _launch_error(launcher, arg, f"{numel} elements", f"{t.numel()} (shape {tuple(t.shape)})")
    if dtype is not None and t.dtype != dtype:
        raise _launch_error(launcher, f"{arg}.dtype", str(dtype), str(t.dtype))
    if floating and not t.is_floating_point():
        raise _launch_error(launcher, f"{arg}.dtype", "floating-point", str(t.dtype))
    if not t.is_contiguous():
        raise _launch_error(launcher, arg, "contiguous (the kernel takes its raw pointer)", f"strides {t.stride()}")
    if device is not None and t.device != device:
        raise _launch_error(launcher, f"{arg}.device", str(device), str(t.device))


def _need_count(launcher, arg, n, upper) -> None:
    if not (_is_int(n) and 0 <= n <= upper):
        raise _launch_error(launcher, arg, f"an int in [0, {upper}]", repr(n))


def _need_bitmap(launcher, storage, numel, device) -> None:
    _need(launcher, "storage", storage, numel=(numel + 7) // 8, dtype=torch.uint8, device=device)


def check_launch_gather_bitmap(src: torch.Tensor, storage: torch.Tensor, n_selected: int) -> None:
    """Before ``triton_bitmap.gather_bitmap``: bitmap bytes for ``src.numel()`` slots, and a count of
    selected slots (the output length) within them."""
    launcher = "gather_bitmap"
    _need(launcher, "src", src)  # reshape(-1) of a strided 1-D tensor stays strided: the pointer would lie
    _need_bitmap(launcher, storage, src.numel(), src.device)
    _need_count(launcher, "n_selected", n_selected, src.numel())


def check_launch_adamw_bitmap(
    weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    storage: torch.Tensor, n_selected: int,
) -> None:
    """Before ``triton_adamw.bitmap_adamw_triton_`` without keys: states hold one entry per selected slot (``n_pruned`` for
    θ, ``numel - n_pruned`` for active slots) and the gradient is compact (that many) or dense (numel).
    The launcher treats any gradient whose length is not ``numel`` as compact, so the length matters."""
    launcher = "adamw_bitmap_"
    numel = weight.numel()
    _need(launcher, "weight", weight, floating=True)
    _need_bitmap(launcher, storage, numel, weight.device)
    _need_count(launcher, "n_selected", n_selected, numel)
    _need(launcher, "grad", grad, floating=True, device=weight.device)
    if grad.numel() not in (n_selected, numel):
        raise _launch_error(launcher, "grad", f"{n_selected} (compact) or {numel} (dense) elements", grad.numel())
    for arg, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _need(launcher, arg, t, numel=n_selected, floating=True, device=weight.device)


def check_launch_dequant_merge(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, theta: torch.Tensor, storage: torch.Tensor,
    encoding: Union[MaskEncoding, str], n_pruned: int, rows: int, cols: int, bits: int, group_cols: int,
    row_stride: int,
) -> None:
    """Before ``triton_qresu.dequant_merge_triton``: packed codes for ``rows × cols`` slots, one scale and
    zero per group the indexing ``row * row_stride + col // group_cols`` can reach, θ of ``n_pruned``, and
    mask storage of the encoding's length."""
    launcher = "dequant_merge"
    for arg, v in (("rows", rows), ("cols", cols)):
        if not (_is_int(v) and v >= 0):
            raise _launch_error(launcher, arg, "an int >= 0", repr(v))
    numel = rows * cols
    if not (_is_int(bits) and bits in BITS):
        raise _launch_error(launcher, "bits", "the int 4 or 8", repr(bits))
    if not (_is_int(group_cols) and group_cols >= 1):
        raise _launch_error(launcher, "group_cols", "an int >= 1", repr(group_cols))
    min_stride = -(-max(cols, 1) // group_cols)
    if not (_is_int(row_stride) and (row_stride == 0 or row_stride >= min_stride)):
        raise _launch_error(launcher, "row_stride", f"0 (one scale) or an int >= ceil(cols / group_cols) = {min_stride}",
                            repr(row_stride))
    try:
        enc = MaskEncoding(encoding)
    except (ValueError, TypeError):
        raise _launch_error(launcher, "encoding", "a mask encoding", repr(encoding)) from None
    _need_count(launcher, "n_pruned", n_pruned, numel)
    device = qdata.device if isinstance(qdata, torch.Tensor) else None
    packed = (numel + 1) // 2 if bits == 4 else numel
    _need(launcher, "qdata", qdata, numel=packed, dtype=torch.uint8)
    n_scales = 1 if row_stride == 0 else rows * row_stride
    _need(launcher, "scale", scale, numel=n_scales, floating=True, device=device)
    _need(launcher, "zero", zero, numel=n_scales, floating=True, device=device)
    _need(launcher, "theta", theta, numel=n_pruned, floating=True, device=device)
    _need(launcher, "storage", storage, numel=_storage_len(enc, numel, n_pruned), dtype=_storage_dtype(enc), device=device)


def check_launch_theta_adamw(
    theta: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    select_mode: int = 0, selector: Optional[torch.Tensor] = None, threshold: Optional[torch.Tensor] = None,
) -> None:
    """Before ``triton_adamw.compact_adamw_triton_``: gradient and states sized like θ; a bool
    ``selector`` sized like θ (select_mode 1) or int64 keys sized like θ with a one-element int64
    ``threshold`` (select_mode 2)."""
    launcher = "theta_adamw"
    _need(launcher, "theta", theta, floating=True)
    n = theta.numel()
    for arg, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _need(launcher, arg, t, numel=n, floating=True, device=theta.device)
    if select_mode == 1:
        _need(launcher, "selector", selector, numel=n, dtype=torch.bool, device=theta.device)
    elif select_mode == 2:
        _need(launcher, "selector", selector, numel=n, dtype=torch.int64, device=theta.device)
        _need(launcher, "threshold", threshold, numel=1, dtype=torch.int64, device=theta.device)
    elif select_mode != 0:
        raise _launch_error(launcher, "select_mode", "0 (all), 1 (bool mask) or 2 (keys)", repr(select_mode))


def check_launch_indexed_adamw(
    param: torch.Tensor, param_index: torch.Tensor, grad: torch.Tensor, grad_index: torch.Tensor,
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
) -> None:
    """Before ``triton_adamw.indexed_adamw_triton_``: k indices into the parameter and into the
    gradient, states of k. Index *values* are the subset of the optimizer state, which
    :func:`check_optimizer_state` range-checks at load time."""
    launcher = "indexed_adamw"
    _need(launcher, "param", param, floating=True)
    _need(launcher, "param_index", param_index, dtype=torch.int64, device=param.device)
    k = param_index.numel()
    if k > param.numel():
        raise _launch_error(launcher, "param_index", f"at most {param.numel()} distinct indices", k)
    _need(launcher, "grad", grad, floating=True, device=param.device)
    if k > grad.numel():
        raise _launch_error(launcher, "grad", f"at least {k} elements", grad.numel())
    _need(launcher, "grad_index", grad_index, numel=k, dtype=torch.int64, device=param.device)
    for arg, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _need(launcher, arg, t, numel=k, floating=True, device=param.device)


def check_launch_bitmap_key_adamw(
    weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    storage: torch.Tensor, keys: torch.Tensor, threshold: torch.Tensor, n_pruned: int,
) -> None:
    """Before ``triton_adamw.bitmap_adamw_triton_`` with keys: states and keys compact (``n_pruned`` each:
    the mask's count of selected slots, not the keys' own length), the gradient compact or weight-shaped,
    and bitmap bytes for the weight."""
    launcher = "bitmap_key_adamw"
    _need(launcher, "weight", weight, floating=True)
    numel = weight.numel()
    _need_bitmap(launcher, storage, numel, weight.device)
    _need_count(launcher, "n_pruned", n_pruned, numel)
    _need(launcher, "grad", grad, floating=True, device=weight.device)
    if grad.numel() not in (n_pruned, numel):
        raise _launch_error(launcher, "grad", f"{n_pruned} (compact) or {numel} (dense) elements", grad.numel())
    for arg, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _need(launcher, arg, t, numel=n_pruned, floating=True, device=weight.device)
    _need(launcher, "keys", keys, numel=n_pruned, dtype=torch.int64, device=weight.device)
    _need(launcher, "threshold", threshold, numel=1, dtype=torch.int64, device=weight.device)


def check_launch_consistency_pass(
    grad: torch.Tensor, ema_m: torch.Tensor, ema_v: torch.Tensor, keys: torch.Tensor, screen_threshold: torch.Tensor
) -> None:
    """Before ``triton_selective.consistency_pass_triton_``: EMAs and keys sized like the gradient, a
    one-element int64 screen threshold."""
    launcher = "consistency_pass"
    _need(launcher, "grad", grad, floating=True)
    n = grad.numel()
    for arg, t in (("ema_m", ema_m), ("ema_v", ema_v)):
        _need(launcher, arg, t, numel=n, floating=True, device=grad.device)
    _need(launcher, "keys", keys, numel=n, dtype=torch.int64, device=grad.device)
    _need(launcher, "screen_threshold", screen_threshold, numel=1, dtype=torch.int64, device=grad.device)
