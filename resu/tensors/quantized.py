"""Quantized storage of a weight's active slots: asymmetric affine codes, packed two per byte at 4 bits.

A weight ``W`` (rows × cols) is split into groups that share one ``scale`` and one ``zero``:

- ``per_tensor``: one group (``scale``/``zero`` are 0-d tensors);
- ``per_channel``: one group per row (output channel), shape ``(rows,)``;
- ``per_group``: ``group_size`` consecutive columns of a row, shape ``(rows, ceil(cols / group_size))``
  (the last group of a row may be shorter).

A value is stored as the code ``q = clamp(round(w / scale + zero), 0, 2**bits - 1)`` and read back as
``(q - zero) * scale``. With ``scale = (max - min) / (2**bits - 1)`` and ``zero = -min / scale`` over a
group, every value of the group maps inside ``[0, 2**bits - 1]`` before rounding, so the error is at
most ``scale / 2`` (up to float rounding). A constant group gets ``scale = 1``, which stores it exactly.

Codes are laid out in the weight's flat (row-major) order; at 4 bits byte ``k`` holds code ``2k`` in its
low nibble and code ``2k + 1`` in its high nibble. Slots listed in ``ignore`` (the pruned slots, whose
values are θ) neither widen a group's range nor carry a meaningful code (they are stored as 0).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

SCHEMES = ("per_tensor", "per_channel", "per_group")
BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How a weight's active slots are quantized: bit width, grouping scheme and group size."""

    bits: int = 4
    scheme: str = "per_channel"
    group_size: int = 128

    def __post_init__(self):
        check_format(self.bits, self.scheme, self.group_size, "QuantFormat")

    def group_cols(self, cols: int) -> int:
        """Columns sharing one scale within a row (``cols`` unless per_group)."""
        return min(self.group_size, max(cols, 1)) if self.scheme == "per_group" else max(cols, 1)

    def row_stride(self, cols: int) -> int:
        """Scales per row in the flat scale tensor (0 for per_tensor: every row shares one)."""
        if self.scheme == "per_tensor":
            return 0
        return -(-max(cols, 1) // self.group_cols(cols))

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.scheme == "per_tensor":
            return ()
        if self.scheme == "per_channel":
            return (rows,)
        return (rows, self.row_stride(cols))


def check_format(bits, scheme, group_size, caller: str) -> None:
    """Raise a ValueError naming the bad argument of ``caller``."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{caller}: `bits` must be 4 or 8, got {bits!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"{caller}: `scheme` must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{caller}: `group_size` must be a positive int, got {group_size!r}")


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 2:
        return w
    if w.dim() < 2:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def scale_index(rows: int, cols: int, fmt: QuantFormat, device) -> torch.Tensor:
    """For every slot (flat order), the flat index of its scale/zero: ``row * row_stride + col // group_cols``."""
    return scale_index_of(rows, cols, fmt.row_stride(cols), fmt.group_cols(cols), device)


def scale_index_of(rows: int, cols: int, row_stride: int, group_cols: int, device) -> torch.Tensor:
    """:func:`scale_index` from the two integers the kernels take."""
    r = torch.arange(rows, device=device).unsqueeze(1)
    c = torch.arange(cols, device=device).unsqueeze(0)
    return (r * row_stride + c // group_cols).reshape(-1)


def affine_params(
    w: torch.Tensor, fmt: QuantFormat, ignore: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` (fp32, shaped by ``fmt.scale_shape``) for ``w``, skipping the slots in ``ignore``."""
    w2 = _as_2d(w.detach()).float()
    rows, cols = w2.shape
    n_scales = max(1, rows * fmt.row_stride(cols)) if fmt.scheme != "per_tensor" else 1
    idx = scale_index(rows, cols, fmt, w2.device)
    flat = w2.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool) if ignore is None else ~ignore.reshape(-1)
    inf = torch.tensor(float("inf"), device=w2.device)
    lo = torch.full((n_scales,), float("inf"), device=w2.device)
    hi = torch.full((n_scales,), float("-inf"), device=w2.device)
    lo = lo.scatter_reduce(0, idx, torch.where(keep, flat, inf), "amin")
    hi = hi.scatter_reduce(0, idx, torch.where(keep, flat, -inf), "amax")
    empty = lo > hi  # a group with no kept slot
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    qmax = 2**fmt.bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -lo / scale
    shape = fmt.scale_shape(rows, cols)
    return scale.reshape(shape), zero.reshape(shape)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Unpacked uint8 codes of ``w`` (its 2-D shape) for the given scales."""
    w2 = _as_2d(w.detach()).float()
    rows, cols = w2.shape
    idx = scale_index(rows, cols, fmt, w2.device)
    s, z = scale.reshape(-1)[idx], zero.reshape(-1)[idx]
    q = torch.round(w2.reshape(-1) / s + z).clamp_(0, 2**fmt.bits - 1)
    return q.to(torch.uint8).reshape(rows, cols)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``(q - zero) * scale`` in fp32 for unpacked codes (2-D)."""
    rows, cols = codes.shape
    idx = scale_index(rows, cols, fmt, codes.device)
    s, z = scale.reshape(-1)[idx], zero.reshape(-1)[idx]
    return ((codes.reshape(-1).float() - z) * s).reshape(rows, cols)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat packed storage of ``codes`` (uint8): two codes per byte at 4 bits, low nibble first."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack(qdata: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Flat uint8 codes (``numel`` of them) from packed storage."""
    if bits == 8:
        return qdata[:numel]
    both = torch.stack([qdata & 0xF, qdata >> 4], dim=1).reshape(-1)
    return both[:numel]


def quantize_active(
    w: torch.Tensor, pruned: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qdata, scale, zero)`` for the active slots of ``w`` (``pruned``: bool, True = pruned, stored as code 0)."""
    scale, zero = affine_params(w, fmt, ignore=pruned)
    codes = quantize_codes(w, scale, zero, fmt).reshape(-1)
    codes = codes.masked_fill(pruned.reshape(-1), 0)
    return pack(codes, fmt.bits), scale.contiguous(), zero.contiguous()


class QuantizedState(NamedTuple):
    """The inner tensors of a QRESU weight besides its mask: packed codes, scales, zeros and θ."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    theta: torch.Tensor
    fmt: QuantFormat

    def map(self, fn) -> "QuantizedState":
        """The same state with ``fn`` applied to every tensor (``fn(t, is_theta)``)."""
        return QuantizedState(fn(self.qdata, False), fn(self.scale, False), fn(self.zero, False), fn(self.theta, True), self.fmt)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero, self.theta))
