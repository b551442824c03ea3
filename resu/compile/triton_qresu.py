"""Triton kernel for QRESU: dequantize packed codes and merge θ into the effective weight, in one pass.

Each program writes ``BLOCK`` consecutive slots of the effective weight (flat, row-major). It reads the
packed codes once (half a byte per slot at 4 bits), the slot's scale and zero (a few values per
program, cached), and for pruned slots θ at the slot's rank among the pruned slots:

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

from resu.compile.triton_bitmap import BLOCK, _selected, cached_block_offsets
from resu.tensors import mask as mask_ops

_ENCODING_IDS = {
    mask_ops.MaskEncoding.BITMAP.value: 0,
    mask_ops.MaskEncoding.PRUNED_INDICES.value: 1,
    mask_ops.MaskEncoding.ACTIVE_INDICES.value: 2,
}


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
def _dequant_merge_kernel(
    q_ptr, scale_ptr, zero_ptr, theta_ptr, mask_ptr, offsets_ptr, out_ptr,
    numel, cols, n_idx, group_cols, row_stride,
    BITS: tl.constexpr, ENCODING: tl.constexpr, SEARCH_STEPS: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    if BITS == 4:
        byte = tl.load(q_ptr + (offs >> 1), mask=in_bounds, other=0).to(tl.int32)
        code = (byte >> ((offs & 1) * 4)) & 15
    else:
        code = tl.load(q_ptr + offs, mask=in_bounds, other=0).to(tl.int32)
    row = offs // cols
    sidx = row * row_stride + (offs - row * cols) // group_cols
    s = tl.load(scale_ptr + sidx, mask=in_bounds, other=1.0)
    z = tl.load(zero_ptr + sidx, mask=in_bounds, other=0.0)
    w = (code.to(tl.float32) - z) * s
    if ENCODING == 0:
        pruned = _selected(mask_ptr, offs, numel, True)
        pi = pruned.to(tl.int32)
        rank = tl.load(offsets_ptr + pid) + tl.cumsum(pi, axis=0) - pi
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


def dequant_merge_triton(
    qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, out_dtype
) -> torch.Tensor:
    """Effective QRESU weight ``(rows, cols)`` in ``out_dtype`` (see :func:`dequant_merge_reference`)."""
    numel = rows * cols
    out = torch.empty((rows, cols), dtype=out_dtype, device=qdata.device)
    if numel == 0:
        return out
    enc = _ENCODING_IDS[mask_ops.MaskEncoding(encoding).value]
    n_blocks = triton.cdiv(numel, BLOCK)
    if enc == 0:
        offsets = cached_block_offsets(storage, numel, True)
        n_idx, steps = 0, 1
    else:
        offsets = storage  # unused: a valid pointer for the launch
        n_idx = storage.numel()
        steps = max(1, int(n_idx).bit_length())
    _dequant_merge_kernel[(n_blocks,)](
        qdata, scale.reshape(-1), zero.reshape(-1), theta, storage, offsets, out,
        numel, cols, n_idx, group_cols, row_stride,
        bits, enc, steps, out_dtype == torch.bfloat16, BLOCK,
    )
    return out
