"""Quantized storage of a weight's active slots: codes packed two per byte at 4 bits, plus block scales.

A weight ``W`` (rows × cols) is split into blocks that share their scale parameters:

- ``per_tensor``: one block (``scale``/``zero`` are 0-d tensors);
- ``per_channel``: one block per row (output channel), shape ``(rows,)``;
- ``per_group`` and ``nf4``: ``group_size`` consecutive columns of a row, shape
  ``(rows, ceil(cols / group_size))`` (the last block of a row may be shorter).

Two ways of turning a code into a value (a scheme picks one, see :data:`SCHEME_TABLE`):

- **affine** (``per_tensor``/``per_channel``/``per_group``, 4 or 8 bits): the code
  ``q = clamp(round(w / scale + zero), 0, 2**bits - 1)`` reads back as ``(q - zero) * scale``. With
  ``scale = (max - min) / (2**bits - 1)`` and ``zero = -min / scale`` over a block, every value maps
  inside ``[0, 2**bits - 1]`` before rounding, so the error is at most ``scale / 2`` (up to float
  rounding). A constant block gets ``scale = 1``, which stores it exactly.
- **codebook** (``nf4``, 4 bits): the code is the index of the nearest of 16 fixed levels
  (:func:`nf4_codebook`, the NormalFloat levels of QLoRA) to ``w / absmax`` and reads back as
  ``level[q] * absmax``, ``absmax`` taken over the block. There is no zero point: ``zero`` is empty.
  With ``double_quant=True`` the block absmaxes are themselves stored as 8-bit affine codes (``scale``
  is uint8), in groups of :data:`DOUBLE_QUANT_GROUP` consecutive blocks (flat order) with one fp32
  scale and zero point per group; ``zero`` then holds those, shape ``(2, n_groups)`` (row 0 scales,
  row 1 zero points). That cuts the scales from 32 to about 8 bits per block.

Codes are laid out in the weight's flat (row-major) order; at 4 bits byte ``k`` holds code ``2k`` in its
low nibble and code ``2k + 1`` in its high nibble. Slots listed in ``ignore`` (the pruned slots, whose
values are θ) neither widen a block's range nor carry a meaningful code (they are stored as 0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import torch

BITS = (4, 8)
#: Block scales per second-level group under double quantization (QLoRA's choice).
DOUBLE_QUANT_GROUP = 256
#: Where NF4's outermost levels sit in the standard normal's quantiles (QLoRA: 0.5 · (1/(2·15) + 1/(2·16))
#: from each end), which makes ±1 the quantile of that offset after normalisation.
NF4_OFFSET = 0.9677083


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One quantization scheme: which bit widths it takes, how slots share scales, how codes read back.

    Args:
        name: the ``scheme=`` string.
        bits: the bit widths it supports.
        grouping: ``"tensor"``, ``"row"`` or ``"group"`` (``group_size`` columns of a row).
        decode: ``"affine"`` (``(q - zero) * scale``) or ``"nf4"`` (``NF4[q] * absmax``).
        default_group_size: the block width when the caller gives none (``"group"`` grouping only).
    """

    name: str
    bits: tuple[int, ...]
    grouping: str
    decode: str
    default_group_size: int = 128

    @property
    def double_quant_ok(self) -> bool:
        """Whether the block scales may be quantized again (codebook schemes: they have no zero point)."""
        return self.decode != "affine"


#: Every scheme, by name. A new scheme is an entry here plus, for a new ``decode``, a codec below.
SCHEME_TABLE: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("per_tensor", (4, 8), "tensor", "affine"),
        Scheme("per_channel", (4, 8), "row", "affine"),
        Scheme("per_group", (4, 8), "group", "affine"),
        Scheme("nf4", (4,), "group", "nf4", default_group_size=64),
    )
}
SCHEMES = tuple(SCHEME_TABLE)
#: The ``decode`` strings the ``resu::dequant_merge``/``resu::qlinear`` ops take (:attr:`QuantFormat.decode`).
DECODES = ("affine", "nf4", "nf4_dq")


@functools.lru_cache(maxsize=None)
def _nf4_levels() -> tuple[float, ...]:
    # QLoRA's construction: 8 positive levels at evenly spaced quantiles of N(0, 1) from NF4_OFFSET down
    # to 0.5 (dropping 0.5 itself), 7 negative ones the same way, and an exact zero; the asymmetry gives
    # 16 levels with a zero among them. Scaled so the largest magnitude is 1.
    def quantiles(n):
        p = torch.linspace(NF4_OFFSET, 0.5, n, dtype=torch.float64)[:-1]
        return torch.special.ndtri(p)

    levels = torch.cat([-quantiles(8), torch.zeros(1, dtype=torch.float64), quantiles(9)]).float()
    levels = torch.sort(levels / levels.abs().max()).values  # normalised in fp32, as the published table was
    return tuple(float(v) for v in levels)


def nf4_codebook(device=None) -> torch.Tensor:
    """The 16 NF4 levels (fp32, ascending, from -1 to 1 with an exact 0), computed from the normal quantiles."""
    return torch.tensor(_nf4_levels(), dtype=torch.float32, device=device)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How a weight's active slots are quantized: bit width, scheme, block size, double quantization."""

    bits: int = 4
    scheme: str = "per_channel"
    group_size: int = 128
    double_quant: bool = False

    def __post_init__(self):
        check_format(self.bits, self.scheme, self.group_size, "QuantFormat", self.double_quant)

    @property
    def spec(self) -> Scheme:
        return SCHEME_TABLE[self.scheme]

    @property
    def decode(self) -> str:
        """How the kernels read a code: ``"affine"``, ``"nf4"`` or ``"nf4_dq"`` (8-bit block scales)."""
        return self.spec.decode + ("_dq" if self.double_quant else "")

    def group_cols(self, cols: int) -> int:
        """Columns sharing one scale within a row (``cols`` unless grouped)."""
        return min(self.group_size, max(cols, 1)) if self.spec.grouping == "group" else max(cols, 1)

    def row_stride(self, cols: int) -> int:
        """Scales per row in the flat scale tensor (0 for per_tensor: every row shares one)."""
        if self.spec.grouping == "tensor":
            return 0
        return -(-max(cols, 1) // self.group_cols(cols))

    def packed_numel(self, numel: int) -> int:
        """Bytes of packed codes for ``numel`` slots (two codes per byte at 4 bits)."""
        return (numel + 1) // 2 if self.bits == 4 else numel

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """Shape of ``scale`` (one entry per block)."""
        grouping = self.spec.grouping
        if grouping == "tensor":
            return ()
        if grouping == "row":
            return (rows,)
        return (rows, self.row_stride(cols))

    def zero_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """Shape of ``zero``: the scale's (affine), empty (codebook), or ``(2, groups)`` (double quant)."""
        if self.spec.decode == "affine":
            return self.scale_shape(rows, cols)
        if not self.double_quant:
            return (0,)
        n_scales = max(1, rows * self.row_stride(cols))
        return (2, -(-n_scales // DOUBLE_QUANT_GROUP))

    @property
    def scale_dtype(self) -> Optional[torch.dtype]:
        """``torch.uint8`` when the scales are stored as codes (double quant), else None (fp32)."""
        return torch.uint8 if self.double_quant else None


def check_format(bits, scheme, group_size, caller: str, double_quant=False) -> None:
    """Raise a ValueError naming the bad argument of ``caller``."""
    # Strict: 4.0 == 4, but the packing and kernels index with it, so only the ints themselves pass.
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{caller}: `bits` must be the int 4 or 8, got {bits!r}")
    if scheme not in SCHEME_TABLE:
        raise ValueError(f"{caller}: `scheme` must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")
    spec = SCHEME_TABLE[scheme]
    if bits not in spec.bits:
        raise ValueError(f"{caller}: scheme {scheme!r} stores {' or '.join(map(str, spec.bits))}-bit codes; pass "
                         f"bits={spec.bits[0]}, got bits={bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{caller}: `group_size` must be a positive int, got {group_size!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"{caller}: `double_quant` must be a bool, got {double_quant!r}")
    if double_quant and not spec.double_quant_ok:
        ok = [s.name for s in SCHEME_TABLE.values() if s.double_quant_ok]
        raise ValueError(f"{caller}: `double_quant=True` needs a codebook scheme ({', '.join(map(repr, ok))}); "
                         f"scheme {scheme!r} has zero points. Pass double_quant=False.")


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 2:
        return w
    if w.dim() < 2:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def scale_index(rows: int, cols: int, fmt: QuantFormat, device) -> torch.Tensor:
    """For every slot (flat order), the flat index of its block: ``row * row_stride + col // group_cols``."""
    return scale_index_of(rows, cols, fmt.row_stride(cols), fmt.group_cols(cols), device)


def scale_index_of(rows: int, cols: int, row_stride: int, group_cols: int, device) -> torch.Tensor:
    """:func:`scale_index` from the two integers the kernels take."""
    r = torch.arange(rows, device=device).unsqueeze(1)
    c = torch.arange(cols, device=device).unsqueeze(0)
    return (r * row_stride + c // group_cols).reshape(-1)


def _block_range(w: torch.Tensor, fmt: QuantFormat, ignore: Optional[torch.Tensor]):
    """Per block (flat), the min and max over the kept slots (0 and 0 for a block with none kept)."""
    w2 = _as_2d(w.detach()).float()
    rows, cols = w2.shape
    n_scales = max(1, rows * fmt.row_stride(cols)) if fmt.spec.grouping != "tensor" else 1
    idx = scale_index(rows, cols, fmt, w2.device)
    flat = w2.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool) if ignore is None else ~ignore.reshape(-1)
    inf = torch.tensor(float("inf"), device=w2.device)
    lo = torch.full((n_scales,), float("inf"), device=w2.device)
    hi = torch.full((n_scales,), float("-inf"), device=w2.device)
    lo = lo.scatter_reduce(0, idx, torch.where(keep, flat, inf), "amin")
    hi = hi.scatter_reduce(0, idx, torch.where(keep, flat, -inf), "amax")
    empty = lo > hi  # a block with no kept slot
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    return lo, hi, fmt.scale_shape(rows, cols)


def _affine_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, -lo / scale


def affine_params(
    w: torch.Tensor, fmt: QuantFormat, ignore: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``(scale, zero)`` (fp32, shaped by ``fmt.scale_shape``) for ``w``, skipping the slots in ``ignore``."""
    lo, hi, shape = _block_range(w, fmt, ignore)
    scale, zero = _affine_from_range(lo, hi, fmt.bits)
    return scale.reshape(shape), zero.reshape(shape)


_SCALE_FORMAT = QuantFormat(8, "per_group", DOUBLE_QUANT_GROUP)  # how double quant stores block scales


def _double_quantize(absmax: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    # The flat block scales as one row, quantized as an 8-bit affine per_group weight would be.
    row = absmax.reshape(1, -1)
    s2, z2 = affine_params(row, _SCALE_FORMAT)
    codes = quantize_codes(row, s2, z2, _SCALE_FORMAT)
    return codes.reshape(shape), torch.stack([s2.reshape(-1), z2.reshape(-1)])


def _absmax_params(w, fmt, ignore):
    lo, hi, shape = _block_range(w, fmt, ignore)
    absmax = torch.maximum(lo.abs(), hi.abs())  # 0 for an empty or all-zero block: it reads back as 0
    if fmt.double_quant:
        return _double_quantize(absmax, shape)
    return absmax.reshape(shape), absmax.new_empty((0,))


def block_scales(scale: torch.Tensor, zero: torch.Tensor, double_quant: bool) -> torch.Tensor:
    """The fp32 block scales, flat: ``scale`` itself, or its 8-bit codes read back under double quant."""
    if not double_quant:
        return scale.reshape(-1).float()
    codes = scale.reshape(-1)
    g = torch.arange(codes.numel(), device=codes.device) // DOUBLE_QUANT_GROUP
    return (codes.float() - zero[1][g]) * zero[0][g]


def _affine_codes(flat, s, z, fmt):
    return torch.round(flat / s + z).clamp_(0, 2**fmt.bits - 1).to(torch.uint8)


def _nf4_codes(flat, s, z_unused, fmt):
    levels = nf4_codebook(flat.device)
    x = torch.where(s > 0, flat / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(flat))
    # nearest level (ties to the lower one): count the midpoints below x
    return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)


class _Codec(NamedTuple):
    """The reference side of one ``decode``: block parameters, encoding, and the per-slot code → value map."""

    params: object  # (w, fmt, ignore) -> (scale, zero) as stored
    encode: object  # (flat w, slot scale, slot zero, fmt) -> uint8 codes
    value: object  # (codes as fp32, slot scale, slot zero) -> fp32 values


_CODECS = {
    "affine": _Codec(affine_params, _affine_codes, lambda q, s, z: (q - z) * s),
    "nf4": _Codec(_absmax_params, _nf4_codes, lambda q, s, z: nf4_codebook(q.device)[q.long()] * s),
}


def _slot_params(scale, zero, rows, cols, decode, group_cols, row_stride, device):
    """Per slot (flat): its block's fp32 scale and zero (zero unused by codebook schemes)."""
    idx = scale_index_of(rows, cols, row_stride, group_cols, device)
    base = decode.removesuffix("_dq")
    s = block_scales(scale, zero, decode.endswith("_dq"))[idx]
    z = zero.reshape(-1)[idx] if base == "affine" else None
    return s, z


def block_params(
    w: torch.Tensor, fmt: QuantFormat, ignore: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` as ``fmt`` stores them for ``w`` (see the module docstring), skipping ``ignore``."""
    return _CODECS[fmt.spec.decode].params(w, fmt, ignore)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Unpacked uint8 codes of ``w`` (its 2-D shape) for the given (stored) block parameters."""
    w2 = _as_2d(w.detach()).float()
    rows, cols = w2.shape
    s, z = _slot_params(scale, zero, rows, cols, fmt.decode, fmt.group_cols(cols), fmt.row_stride(cols), w2.device)
    codes = _CODECS[fmt.spec.decode].encode(w2.reshape(-1), s, z, fmt)
    return codes.reshape(rows, cols)


def dequantize_flat(codes, scale, zero, decode: str, rows: int, cols: int, group_cols: int, row_stride: int):
    """fp32 values of flat unpacked ``codes`` from the kernels' integer description: the reference formula."""
    s, z = _slot_params(scale, zero, rows, cols, decode, group_cols, row_stride, codes.device)
    return _CODECS[decode.removesuffix("_dq")].value(codes.reshape(-1).float(), s, z)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The fp32 values (2-D) of unpacked codes."""
    rows, cols = codes.shape
    out = dequantize_flat(codes, scale, zero, fmt.decode, rows, cols, fmt.group_cols(cols), fmt.row_stride(cols))
    return out.reshape(rows, cols)


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


#: Slots quantized at once by :func:`quantize_active`: its temporaries (indices, per-slot scales) are a
#: few times a chunk's size, so a large weight costs about 20 MiB of scratch instead of 5x its own size.
CHUNK_SLOTS = 1 << 20


def _row_chunks(rows: int, cols: int, fmt: QuantFormat) -> list[slice]:
    """Row ranges that quantize independently: blocks never span rows (one per tensor does: one chunk)."""
    if fmt.spec.grouping == "tensor" or rows * cols <= CHUNK_SLOTS:
        return [slice(0, rows)]
    step = max(2, CHUNK_SLOTS // max(cols, 1) // 2 * 2)  # an even row count: every chunk packs whole bytes
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


def quantize_active(
    w: torch.Tensor, pruned: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qdata, scale, zero)`` for the active slots of ``w`` (``pruned``: bool, True = pruned, stored as code 0).

    Works through the rows in chunks of about :data:`CHUNK_SLOTS` slots; the result is the same as
    :func:`block_params`, :func:`quantize_codes` and :func:`pack` over the whole weight.
    """
    w2 = _as_2d(w.detach())
    rows, cols = w2.shape
    p2 = pruned.reshape(rows, cols)
    chunks = _row_chunks(rows, cols, fmt)
    plain = dataclasses.replace(fmt, double_quant=False)
    params = [block_params(w2[c], plain, ignore=p2[c]) for c in chunks]
    scale = torch.cat([s.reshape(-1) for s, _ in params]).reshape(fmt.scale_shape(rows, cols))
    zero = torch.cat([z.reshape(-1) for _, z in params]).reshape(plain.zero_shape(rows, cols))
    del params
    slot_scale = scale  # what the codes are computed against: the scales as they will read back
    if fmt.double_quant:
        scale, zero = _double_quantize(scale, scale.shape)
        slot_scale = block_scales(scale, zero, True).reshape(scale.shape)
    qdata = torch.cat([
        pack(quantize_codes(w2[c], slot_scale[c] if slot_scale.dim() else slot_scale,
                            zero[c] if plain.spec.decode == "affine" and zero.dim() else zero, plain)
             .masked_fill_(p2[c], 0), fmt.bits)
        for c in chunks
    ])
    return qdata, scale.contiguous(), zero.contiguous()


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
