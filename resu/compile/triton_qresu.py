"""Triton kernel for QRESU: dequantize packed codes and merge θ into the effective weight, in one pass.

Each program writes ``QBLOCK`` consecutive slots of the effective weight (flat, row-major). It reads the
packed codes once (half a byte per slot at 4 bits), the slot's block parameters (a few values per
program, cached), and for pruned slots θ at the slot's rank among the pruned slots.

A code reads back by the weight's ``decode`` (:attr:`resu.tensors.quantized.QuantFormat.decode`):
affine ``(q - zero) * scale``; NF4 ``level[q] * scale``, the 16 levels loaded from a small table that
stays in cache; NF4 with double quantization first reads the block scale back from its 8-bit code,
``(c - zero2[g]) * scale2[g]`` with ``g`` the block's group of 256, in the same pass.

The θ rank of a pruned slot:

- bitmap masks: the rank is the block's first pruned index (``cached_block_offsets``, a per-block
  prefix sum computed once per mask) plus an in-block ``tl.cumsum`` of the pruned bits;
- index masks (int32, sorted): a branch-free binary search over the index list gives the number of
  listed slots before each slot, which is the rank (pruned list) or ``slot - rank`` (active list); the
  list is small (these encodings are chosen only below 3.1% or above 96.9% sparsity) and stays in cache.

This module imports Triton; it is imported only by the CUDA kernel registration and by tests (on CPU
under ``TRITON_INTERPRET=1``). The reference is :func:`resu.compile.qlinear.dequant_merge_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.triton_bitmap import cached_block_offsets, tile_ranks
from resu.tensors import mask as mask_ops
from resu.compile.launch_checks import check_launch_dequant_merge
from resu.tensors.quantized import DOUBLE_QUANT_GROUP, nf4_codebook

# Slots per program and warps per program: 16 slots per thread amortize the per-block work, and
# two warps keep the in-block rank scan cheap; the best of a sweep on an H100 (see BENCHMARKS.md).
QBLOCK = 1024
NUM_WARPS = 2

_ENCODING_IDS = {
    mask_ops.MaskEncoding.BITMAP.value: 0,
    mask_ops.MaskEncoding.PRUNED_INDICES.value: 1,
    mask_ops.MaskEncoding.ACTIVE_INDICES.value: 2,
}
_DECODE_IDS = {"affine": 0, "nf4": 1, "nf4_dq": 2}
DQ_GROUP = tl.constexpr(DOUBLE_QUANT_GROUP)


@triton.jit
def _count_below(idx_ptr, n_idx, offs, SEARCH_STEPS: tl.constexpr):
    """Per slot: how many entries of the sorted list ``idx`` are < the slot, and whether the slot is listed."""
    lo = tl.zeros_like(offs)
    hi = tl.zeros_like(offs) + n_idx
    for _ in tl.static_range(SEARCH_STEPS):
        open_ = lo < hi
        mid = (lo + hi) >> 1
        v = tl.load(idx_ptr + mid, mask=open_, other=0)
        right = open_ & (v < offs)
        left = open_ & (v >= offs)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(left, mid, hi)
    at = tl.load(idx_ptr + lo, mask=lo < n_idx, other=-1)
    return lo, at == offs


@triton.jit
def _to_bf16_rtne(x):
    """fp32 → bf16 rounding to nearest even, as ``torch.Tensor.to`` does (NaN stays NaN).

    Spelled out in integer arithmetic so the kernel gives the same bits compiled and under the
    interpreter (whose fp32 → bf16 cast truncates).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = tl.where(x != x, 0x7FC00000, bits)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _block_params(scale_ptr, zero_ptr, sidx, ok, n_groups, DECODE: tl.constexpr):
    """A block's fp32 scale and zero point (the zero is unused by NF4); ``ok`` masks the loads."""
    if DECODE == 2:  # 8-bit scale codes, one affine (scale2, zero2) per DOUBLE_QUANT_GROUP blocks
        g = sidx // DQ_GROUP
        c = tl.load(scale_ptr + sidx, mask=ok, other=0).to(tl.float32)
        s = (c - tl.load(zero_ptr + n_groups + g, mask=ok, other=0.0)) * tl.load(zero_ptr + g, mask=ok, other=1.0)
        return s, s
    s = tl.load(scale_ptr + sidx, mask=ok, other=1.0)
    if DECODE == 0:
        return s, tl.load(zero_ptr + sidx, mask=ok, other=0.0)
    return s, s


@triton.jit
def _dequant_merge_kernel(
    q_ptr, scale_ptr, zero_ptr, lut_ptr, theta_ptr, mask_ptr, offsets_ptr, out_ptr, numel, n_idx, n_groups,
    COLS: tl.constexpr, GROUP_COLS: tl.constexpr, ROW_STRIDE: tl.constexpr,
    SCALE_MODE: tl.constexpr, BITS: tl.constexpr, DECODE: tl.constexpr, ENCODING: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # A block of BLOCK slots as a (BLOCK // 8, 8) tile, laid out like tile_ranks' (one mask byte per row).
    pid = tl.program_id(0)
    byte_row = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    offs = pid * BLOCK + byte_row[:, None] * 8 + bit[None, :]
    in_bounds = offs < numel
    if BITS == 4:
        # Four whole bytes per tile row (a vector load), split into nibbles: even slots low, odd high.
        byte_offs = pid * (BLOCK // 2) + byte_row[:, None] * 4 + tl.arange(0, 4)[None, :]
        packed = tl.load(q_ptr + byte_offs, mask=byte_offs * 2 < numel, other=0).to(tl.int32)
        code = tl.interleave(packed & 15, packed >> 4)
    else:
        code = tl.load(q_ptr + offs, mask=in_bounds, other=0).to(tl.int32)
    if SCALE_MODE == 0:  # per tensor: one scale (affine only: NF4 is always grouped)
        s = tl.load(scale_ptr)
        z = tl.load(zero_ptr)
    elif SCALE_MODE == 1:  # the 8 slots of a tile row share a scale (groups and rows are multiples of 8)
        first = pid * BLOCK + byte_row * 8
        row = first // COLS  # COLS is a compile-time constant: a multiply and a shift, no division
        sidx = row * ROW_STRIDE + (first - row * COLS) // GROUP_COLS
        s, z = _block_params(scale_ptr, zero_ptr, sidx, first < numel, n_groups, DECODE)
        s = s[:, None]
        z = z[:, None]
    else:
        row = offs // COLS
        sidx = row * ROW_STRIDE + (offs - row * COLS) // GROUP_COLS
        s, z = _block_params(scale_ptr, zero_ptr, sidx, in_bounds, n_groups, DECODE)
    if DECODE == 0:
        w = (code.to(tl.float32) - z) * s
    else:
        w = tl.load(lut_ptr + code) * s  # code < 16: always in the table
    if ENCODING == 0:
        _, pruned, rank = tile_ranks(mask_ptr, offsets_ptr, numel, True, BLOCK)
    else:
        below, listed = _count_below(mask_ptr, n_idx, offs, SEARCH_STEPS)
        if ENCODING == 1:
            pruned = listed & in_bounds
            rank = below
        else:
            pruned = (~listed) & in_bounds
            rank = offs - below
    theta = tl.load(theta_ptr + rank, mask=pruned, other=0.0).to(tl.float32)
    w = tl.where(pruned, theta, w)
    if OUT_BF16:
        tl.store(out_ptr + offs, _to_bf16_rtne(w), mask=in_bounds)
    else:
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=in_bounds)


def _scale_mode(cols: int, group_cols: int, row_stride: int) -> int:
    """0: one scale; 1: one scale per 8 consecutive slots (loaded once per tile row); 2: per slot."""
    if row_stride == 0:
        return 0
    return 1 if cols % 8 == 0 and group_cols % 8 == 0 else 2


_LUTS: dict[torch.device, torch.Tensor] = {}


def _codebook_on(device: torch.device) -> torch.Tensor:
    """The NF4 table on ``device``, made once per device (not once per launch)."""
    if device not in _LUTS:
        _LUTS[device] = nf4_codebook(device)
    return _LUTS[device]


def dequant_merge_triton(
    qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode,
    out_dtype,
) -> torch.Tensor:
    """Effective QRESU weight ``(rows, cols)`` in ``out_dtype`` (see :func:`dequant_merge_reference`)."""
    check_launch_dequant_merge(
        qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode
    )
    numel = rows * cols
    out = torch.empty((rows, cols), dtype=out_dtype, device=qdata.device)
    if numel == 0:
        return out
    enc = _ENCODING_IDS[mask_ops.MaskEncoding(encoding).value]
    n_blocks = triton.cdiv(numel, QBLOCK)
    if enc == 0:
        offsets = cached_block_offsets(storage, numel, True, QBLOCK)
        n_idx, steps = 0, 1
    else:
        offsets = storage  # unused: a valid pointer for the launch
        n_idx = storage.numel()
        steps = max(1, int(n_idx).bit_length())
    dec = _DECODE_IDS[decode]
    lut = _codebook_on(qdata.device) if dec else scale  # the affine decode never reads the table
    zero_flat = zero.reshape(-1) if zero.numel() else scale.reshape(-1)  # NF4's empty zero: any valid pointer
    n_groups = zero.shape[-1] if dec == 2 else 0
    _dequant_merge_kernel[(n_blocks,)](
        qdata, scale.reshape(-1), zero_flat, lut, theta, storage, offsets, out, numel, n_idx, n_groups,
        cols, group_cols, row_stride, _scale_mode(cols, group_cols, row_stride), bits, dec, enc, steps,
        out_dtype == torch.bfloat16, QBLOCK,
        num_warps=NUM_WARPS,
    )
    return out
