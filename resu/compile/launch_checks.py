"""Host-side checks before each Triton launch: what a launcher relies on, from tensor metadata only.

Each ``check_launch_*`` reads ``numel``, ``dtype``, ``device`` and contiguity, never tensor contents, so
it costs no device sync and runs before every launch. They check lengths; the contents a length check
cannot see (popcounts, index values) are guaranteed when data is loaded
(:func:`resu.tensors.validate.validate_layout`, :func:`resu.optim.state_checks.check_optimizer_state`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch

from resu.tensors.mask_checks import MAX_NUMEL
from resu.tensors.mask_kernels import MaskEncoding, _storage_dtype, _storage_len
from resu.tensors.quantized import BITS, DECODES, DOUBLE_QUANT_GROUP
from resu.tensors.validate import _is_int

__all__ = [
    "check_launch_adamw_bitmap",
    "check_launch_bitmap_key_adamw",
    "check_launch_consistency_pass",
    "check_launch_dequant_merge",
    "check_launch_gather_bitmap",
    "check_launch_indexed_adamw",
    "check_launch_theta_adamw",
]


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


def check_launch_grouped_adamw(items) -> None:
    """Before ``triton_adamw.grouped_adamw_triton_``: per weight, fp32 contiguous tensors on one device,
    states of ``n_selected`` entries, a gradient of ``n_selected`` (compact) or ``numel`` (``GRAD_DENSE``)
    values, and for a bitmap kind the mask bytes of ``numel`` slots; at most ``MAX_NUMEL`` slots a weight
    (int32 offsets); no weight twice with the same slots (pruned or active: the kernel writes whole tiles
    of a weight, and the launches of one call do not run in list order). The kernel reads raw fp32
    pointers."""
    launcher = "grouped_adamw"
    device = items[0][1].device if items else None
    seen = {}
    for i, item in enumerate(items):
        first = seen.setdefault((item[1].data_ptr(), item[0] & 3), i)
        if first != i and item[1].numel():
            raise ValueError(f"{launcher}: `items[{i}].holder` is the weight of items[{first}], with the same slots; "
                             "a launch steps each weight's slots once (it writes whole tiles): pass each weight once")
    for i, item in enumerate(items):
        if not _grouped_item_accepts(item, device):
            _check_grouped_item(launcher, i, item, device)


def _grouped_item_accepts(item, device) -> bool:
    """The common case of one item of :func:`check_launch_grouped_adamw` in one expression (an optimizer
    step checks every weight); anything else goes through :func:`_check_grouped_item`, which raises the
    error naming the argument."""
    kind, holder, grad, exp_avg, exp_avg_sq, _step, storage, n_selected = item
    f32 = torch.float32
    try:
        numel, where = holder.numel(), kind & 3
        return (
            numel <= MAX_NUMEL and type(n_selected) is int and 0 <= n_selected <= numel
            and (n_selected == numel if where == 0 else
                 where in (1, 2) and storage.dtype is torch.uint8 and storage.numel() == (numel + 7) // 8
                 and storage.is_contiguous() and storage.device == device)
            and grad.numel() == (numel if kind & 4 else n_selected)
            and exp_avg.numel() == n_selected and exp_avg_sq.numel() == n_selected
            and holder.dtype is f32 and grad.dtype is f32 and exp_avg.dtype is f32 and exp_avg_sq.dtype is f32
            and holder.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()
            and exp_avg_sq.is_contiguous()
            and holder.device == device and grad.device == device and exp_avg.device == device
            and exp_avg_sq.device == device
        )
    except (AttributeError, TypeError):  # not tensors, or not an int kind: the full checks say what
        return False


def _check_grouped_item(launcher, i, item, device) -> None:
    kind, holder, grad, exp_avg, exp_avg_sq, _step, storage, n_selected = item
    _need(launcher, f"items[{i}].holder", holder, dtype=torch.float32, device=device)
    numel = holder.numel()
    if numel > MAX_NUMEL:  # the kernel's block offsets are int32
        raise _launch_error(launcher, f"items[{i}].holder", f"at most {MAX_NUMEL} elements", numel)
    _need_count(launcher, f"items[{i}].n_selected", n_selected, numel)
    where = kind & 3
    if where == 0 and n_selected != numel:
        raise _launch_error(launcher, f"items[{i}].n_selected", f"{numel} (a compact vector)", n_selected)
    if where in (1, 2):
        _need_bitmap(launcher, storage, numel, device)
    elif where != 0:
        raise _launch_error(launcher, f"items[{i}].kind", "a KIND_* code", kind)
    _need(launcher, f"items[{i}].grad", grad, numel=numel if kind & 4 else n_selected, dtype=torch.float32,
          device=device)
    for arg, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _need(launcher, f"items[{i}].{arg}", t, numel=n_selected, dtype=torch.float32, device=device)


def check_launch_dequant_merge(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, theta: torch.Tensor, storage: torch.Tensor,
    encoding: Union[MaskEncoding, str], n_pruned: int, rows: int, cols: int, bits: int, group_cols: int,
    row_stride: int, decode: str = "affine",
) -> None:
    """Before ``triton_qresu.dequant_merge_triton``: packed codes for ``rows × cols`` slots, one scale
    per block the indexing ``row * row_stride + col // group_cols`` can reach (8-bit codes under double
    quantization), zero points as ``decode`` stores them, θ of ``n_pruned``, and mask storage of the
    encoding's length.

    It runs on every forward and input gradient of every QRESU layer, so the common case is one
    function: the lengths and dtypes the scalar arguments imply are computed once per shape and format
    (:func:`_dequant_merge_expect`), and each tensor costs a few attribute reads. Anything it does not
    accept goes through the full check, which raises the error naming the argument.
    """
    if _dequant_merge_accepts(qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols,
                              row_stride, decode):
        return
    _check_dequant_merge_in_full(qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols,
                                 row_stride, decode)


class _DequantMergeExpect(NamedTuple):
    """What valid scalar arguments of ``dequant_merge`` imply about its tensors."""

    numel: int
    packed: int  # code bytes
    n_scales: int
    scale_codes: bool  # scales are 8-bit codes (double quantization), else floating
    n_zero: int
    storage_len: Optional[int]  # None: depends on n_pruned (index encodings)
    storage_dtype: torch.dtype
    pruned_listed: bool  # index encodings: the list holds the pruned slots (else the active ones)


_EXPECT: dict[tuple, Optional[_DequantMergeExpect]] = {}


def _dequant_merge_expect(encoding, rows, cols, bits, group_cols, row_stride, decode) -> Optional[_DequantMergeExpect]:
    """The tensors' expected lengths and dtypes, or None if a scalar argument is invalid (every
    scalar condition of the full check; the ints are exact ints, checked by the caller)."""
    if rows < 0 or cols < 0 or bits not in BITS or group_cols < 1:
        return None
    if not (row_stride == 0 or row_stride >= -(-max(cols, 1) // group_cols)):
        return None
    try:
        enc = MaskEncoding(encoding)
    except (ValueError, TypeError):
        return None
    if not isinstance(decode, str) or decode not in DECODES or (decode != "affine" and (bits != 4 or row_stride == 0)):
        return None
    numel = rows * cols
    n_scales = 1 if row_stride == 0 else rows * row_stride
    n_zero = {"affine": n_scales, "nf4": 0}.get(decode, 2 * -(-max(n_scales, 1) // DOUBLE_QUANT_GROUP))
    storage_len = _storage_len(enc, numel, 0) if enc is MaskEncoding.BITMAP else None
    return _DequantMergeExpect(numel, (numel + 1) // 2 if bits == 4 else numel, n_scales, decode.endswith("_dq"),
                               n_zero, storage_len, _storage_dtype(enc), enc is MaskEncoding.PRUNED_INDICES)


def _dequant_merge_accepts(qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols,
                           row_stride, decode) -> bool:
    """Whether the full check would pass, decided from cached scalar expectations and tensor metadata.

    Accepts only what the full check accepts (the same conditions, exact ints only: a float or bool
    that would hash like an int goes to the full check), so its errors are unchanged.
    """
    if not (type(n_pruned) is int and type(rows) is int and type(cols) is int and type(bits) is int
            and type(group_cols) is int and type(row_stride) is int):
        return False
    key = (encoding, rows, cols, bits, group_cols, row_stride, decode)
    try:
        exp = _EXPECT[key]
    except KeyError:
        if len(_EXPECT) >= 4096:  # shapes come from a model's layers: never grow without bound
            _EXPECT.clear()
        exp = _EXPECT[key] = _dequant_merge_expect(*key)
    except TypeError:  # an unhashable argument: the full check says what is wrong
        return False
    if exp is None or not 0 <= n_pruned <= exp.numel:
        return False
    tensor = torch.Tensor
    if not (isinstance(qdata, tensor) and isinstance(scale, tensor) and isinstance(zero, tensor)
            and isinstance(theta, tensor) and isinstance(storage, tensor)):
        return False
    storage_len = exp.storage_len
    if storage_len is None:
        storage_len = n_pruned if exp.pruned_listed else exp.numel - n_pruned
    device = qdata.device
    return (
        qdata.numel() == exp.packed and qdata.dtype is torch.uint8 and qdata.is_contiguous()
        and scale.numel() == exp.n_scales
        and (scale.dtype is torch.uint8 if exp.scale_codes else scale.is_floating_point())
        and scale.is_contiguous() and scale.device == device
        and zero.numel() == exp.n_zero and zero.is_floating_point() and zero.is_contiguous() and zero.device == device
        and theta.numel() == n_pruned and theta.is_floating_point() and theta.is_contiguous()
        and theta.device == device
        and storage.numel() == storage_len and storage.dtype is exp.storage_dtype and storage.is_contiguous()
        and storage.device == device
    )


def _check_dequant_merge_in_full(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, theta: torch.Tensor, storage: torch.Tensor,
    encoding: Union[MaskEncoding, str], n_pruned: int, rows: int, cols: int, bits: int, group_cols: int,
    row_stride: int, decode: str = "affine",
) -> None:
    """Every condition of :func:`check_launch_dequant_merge`, in order; raises on the first that fails."""
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
    if decode not in DECODES:
        raise _launch_error(launcher, "decode", f"one of {', '.join(map(repr, DECODES))}", repr(decode))
    if decode != "affine" and (bits != 4 or row_stride == 0):
        raise _launch_error(launcher, "bits/row_stride", "4 and >= 1 for NF4 codes", f"{bits} and {row_stride}")
    n_scales = 1 if row_stride == 0 else rows * row_stride
    dq = decode.endswith("_dq")
    _need(launcher, "scale", scale, numel=n_scales, dtype=torch.uint8 if dq else None, floating=not dq,
          device=device)
    n_zero = {"affine": n_scales, "nf4": 0}.get(decode, 2 * -(-max(n_scales, 1) // DOUBLE_QUANT_GROUP))
    _need(launcher, "zero", zero, numel=n_zero, floating=True, device=device)
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
