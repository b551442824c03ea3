"""Triton kernels of the compact reduce-scatter: pack the trainable slots of many shard pieces into one
send buffer, and spread a received compact buffer back over them, one launch each.

FSDP2 hands the reduce-scatter one flat gradient buffer of ``world`` equal chunks; chunk ``r`` holds
every parameter's rows for rank ``r``. :mod:`resu.distributed.reduce_scatter` describes each (rank,
parameter) piece by a table row: where it starts in the source and in the destination, its length,
and which of its slots travel (all; or those a bitmap marks pruned; or those it marks active, the
bitmap being that rank's rows of the full weight's mask). A program handles one block of
``BLOCK`` slots of one piece (:func:`resu.compile.triton_bitmap.tile_ranks_at` gives each selected
slot its compact rank), so the whole call is one pack launch and one unpack launch, where the torch
reference decodes every mask and gathers per rank (dozens of launches per parameter group).

The tables hold element offsets, not addresses of FSDP2's buffers (new ones every backward), so
they are built once per set of masks and reused; the bitmap and block-offset addresses in them
belong to tensors the reduce-scatter's plan keeps alive. This module imports Triton; it is imported
for CUDA tensors, and by tests under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.triton_bitmap import BLOCK, NUM_WARPS, program_table, table_block_slots

#: How a piece's slots are chosen: every slot; those its bitmap marks pruned; those it marks active.
ALL_SLOTS, PRUNED_SLOTS, ACTIVE_SLOTS = 0, 1, 2
ROW = 6  # src offset, dst offset, numel, selection, bitmap address, block-offsets address


@triton.jit
def _piece(table_ptr, prog_item_ptr, prog_block_ptr, BLOCK: tl.constexpr, ROW: tl.constexpr):
    """This program's piece and block: (src offset, dst offset, flat slot offsets in the piece,
    selected, compact ranks, piece length)."""
    pid = tl.program_id(0)
    item = tl.load(prog_item_ptr + pid)
    row = table_ptr + item.to(tl.int64) * ROW
    numel = tl.load(row + 2)
    offs, sel, rank = table_block_slots(row, numel, tl.load(row + 3), tl.load(prog_block_ptr + pid), BLOCK)
    return tl.load(row + 0), tl.load(row + 1), offs, sel, rank, numel


@triton.jit
def _pack_kernel(src_ptr, dst_ptr, table_ptr, prog_item_ptr, prog_block_ptr, BLOCK: tl.constexpr, ROW: tl.constexpr):
    src_off, dst_off, offs, sel, rank, _ = _piece(table_ptr, prog_item_ptr, prog_block_ptr, BLOCK, ROW)
    vals = tl.load(src_ptr + src_off + offs, mask=sel, other=0)
    tl.store(dst_ptr + dst_off + rank, vals, mask=sel)


@triton.jit
def _unpack_kernel(src_ptr, dst_ptr, table_ptr, prog_item_ptr, prog_block_ptr, BLOCK: tl.constexpr, ROW: tl.constexpr):
    # Table rows as for packing, read the other way: ``src`` is the compact buffer (at the piece's dst
    # offset), ``dst`` the dense chunk (at its src offset); every slot of the piece is written, 0 if not selected.
    dense_off, compact_off, offs, sel, rank, numel = _piece(table_ptr, prog_item_ptr, prog_block_ptr, BLOCK, ROW)
    vals = tl.load(src_ptr + compact_off + rank, mask=sel, other=0)
    tl.store(dst_ptr + dense_off + offs, vals, mask=offs < numel)


def program_map(numels: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(program -> piece, program -> block of that piece) for pieces of ``numels`` slots, on ``device``."""
    return program_table(device, tuple(cdiv(n, BLOCK) for n in numels))


def pack_(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, prog_item: torch.Tensor, prog_block: torch.Tensor) -> None:
    """Copy each table piece's selected slots of flat ``src`` into flat ``dst``, compactly."""
    if prog_item.numel():
        _pack_kernel[(prog_item.numel(),)](src, dst, table, prog_item, prog_block, BLOCK, ROW, num_warps=NUM_WARPS)


def unpack_(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, prog_item: torch.Tensor, prog_block: torch.Tensor) -> None:
    """Spread each table piece's compact values of flat ``src`` over its slots of flat ``dst`` (0 where not selected)."""
    if prog_item.numel():
        _unpack_kernel[(prog_item.numel(),)](src, dst, table, prog_item, prog_block, BLOCK, ROW, num_warps=NUM_WARPS)
