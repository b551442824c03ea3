"""Triton kernel: a compact vector spread over the selected slots of a dense tensor, zeros elsewhere.

The inverse of :func:`resu.compile.triton_bitmap.gather_bitmap`: slot ``i`` of the output takes
``values[rank(i)]`` where the bitmap selects it (pruned slots, or active ones) and 0 where it does
not. One launch writes every slot, so no separate zero fill and no index tensor is built. FSDP2's
gradient copy-in (:mod:`resu.distributed.fsdp`) turns each compact θ gradient into its dense shape
with it, in every backward; the reference it replaces (``CompactGrad.to_dense``: a decoded mask, an
index list and an ``index_put``) cost about ten host-side ops per weight.

This module imports Triton: it is imported for CUDA tensors, and by tests on CPU under
``TRITON_INTERPRET=1``. The reference is :func:`resu.tensors.mask.scatter_pruned` /
:func:`~resu.tensors.mask.scatter_active` into zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.triton_bitmap import BLOCK, NUM_WARPS, cached_block_offsets, tile_ranks
from resu.tensors import mask_kernels as mask_ops


@triton.jit
def _scatter_kernel(values_ptr, bits_ptr, offsets_ptr, out_ptr, numel, SELECT_PRUNED: tl.constexpr, BLOCK: tl.constexpr):
    offs, sel, rank = tile_ranks(bits_ptr, offsets_ptr, numel, SELECT_PRUNED, BLOCK)
    vals = tl.load(values_ptr + rank, mask=sel, other=0)
    tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=offs < numel)


def scatter_bitmap(values: torch.Tensor, storage: torch.Tensor, numel: int, select_pruned: bool) -> torch.Tensor:
    """Flat ``(numel,)`` tensor of ``values``' dtype: ``values`` (ascending) at the slots the bitmap
    ``storage`` selects (pruned ones if ``select_pruned``, else active ones), 0 elsewhere.

    ``values`` must hold exactly one entry per selected slot (a CompactGrad's values for its mask);
    the lengths that can be checked without reading the mask are checked here.
    """
    if storage.dtype != torch.uint8 or storage.dim() != 1 or storage.numel() != mask_ops._bitmap_len(numel):
        raise ValueError(
            f"scatter_bitmap: `storage` must be the uint8 bitmap of {numel} slots "
            f"({mask_ops._bitmap_len(numel)} bytes), got {tuple(storage.shape)} {storage.dtype}"
        )
    if values.dim() != 1 or values.numel() > numel or values.device != storage.device:
        raise ValueError(
            f"scatter_bitmap: `values` must be a 1-D vector of at most {numel} entries on {storage.device}, "
            f"got {tuple(values.shape)} on {values.device}"
        )
    out = torch.empty(numel, dtype=values.dtype, device=values.device)
    if numel == 0:
        return out
    offsets = cached_block_offsets(storage, numel, select_pruned)
    _scatter_kernel[(offsets.numel(),)](
        values.contiguous(), storage, offsets, out, numel, select_pruned, BLOCK, num_warps=NUM_WARPS
    )
    return out
