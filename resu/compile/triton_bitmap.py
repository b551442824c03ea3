"""Triton kernels over bitmap-encoded masks: the rank of every selected slot, and a gather of them.

A bitmap mask (bit 1 = pruned, LSB first, see :mod:`resu.tensors.mask`) says *which* slots are
selected but not *where* each lands in a compact vector. Each program handles ``BLOCK`` consecutive
slots; a tiny prefix sum over per-block popcounts (``block_offsets``, computed in PyTorch over n/8
bytes, once per mask storage) gives every block its first compact index, and in-block scans
(:func:`tile_ranks`) give the rest. So
every kernel over a bitmap (the gather here, the fused AdamW of :mod:`resu.compile.triton_adamw`) is
one pass over the weight with no index tensor of size n_pruned ever built.

This module imports Triton; it is only imported by the CUDA kernel registrations and by tests (which
run it on CPU under ``TRITON_INTERPRET=1``). Each kernel has a plain-PyTorch reference in
:mod:`resu.compile.linear` (``gather_masked``) and :mod:`resu.optim.adamw_step`.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.launch_checks import check_launch_gather_bitmap

BLOCK = 1024  # slots per program; a multiple of 8 so blocks start on byte boundaries
NUM_WARPS = 2  # 16 slots per thread: the fastest on an H100 for these memory-bound kernels

_POPCOUNT_CPU = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
_POPCOUNT_BY_DEVICE: dict[torch.device, torch.Tensor] = {}


def _popcount_table(device: torch.device) -> torch.Tensor:
    # Cached per device: a host-to-device copy on every call would stall the CPU on the GPU queue.
    table = _POPCOUNT_BY_DEVICE.get(device)
    if table is None:
        table = _POPCOUNT_BY_DEVICE[device] = _POPCOUNT_CPU.to(device)
    return table


def block_offsets(storage: torch.Tensor, numel: int, select_pruned: bool, block: int = BLOCK) -> torch.Tensor:
    """Exclusive prefix sum of selected slots per block of ``block`` slots (int32, one per block)."""
    n_blocks = cdiv(numel, block)
    bytes_per_block = block // 8
    pop = _popcount_table(storage.device)[storage.to(torch.int64)]
    pop = torch.nn.functional.pad(pop, (0, n_blocks * bytes_per_block - pop.numel()))
    counts = pop.view(n_blocks, bytes_per_block).sum(1, dtype=torch.int32)
    if not select_pruned:
        sizes = torch.full((n_blocks,), block, dtype=torch.int32, device=storage.device)
        sizes[-1] = numel - (n_blocks - 1) * block
        counts = sizes - counts
    return (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()


# (id(storage), select_pruned, block) -> (weakref to storage, storage._version, offsets). The offsets depend on
# the mask alone, so they are computed once per mask storage tensor instead of on every backward and
# optimizer step; an entry dies with its storage tensor (weakref callback) and is recomputed if the
# storage is ever written in place (version counter). 4 bytes per 1024 slots.
_OFFSETS_CACHE: dict[tuple[int, bool, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def cached_block_offsets(storage: torch.Tensor, numel: int, select_pruned: bool, block: int = BLOCK) -> torch.Tensor:
    """:func:`block_offsets` of ``storage``, computed once per mask storage tensor and block size."""
    key = (id(storage), select_pruned, block)
    hit = _OFFSETS_CACHE.get(key)
    if hit is not None and hit[0]() is storage and hit[1] == storage._version:
        return hit[2]
    offsets = block_offsets(storage, numel, select_pruned, block)
    ref = weakref.ref(storage, lambda _ref, key=key: _OFFSETS_CACHE.pop(key, None))
    _OFFSETS_CACHE[key] = (ref, storage._version, offsets)
    return offsets


@triton.jit
def _popcount8(x):
    """Set bits of each value in 0..255 (no popcount builtin that also runs in the interpreter)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def byte_prefix(byte, bit):
    """Per mask byte (``byte``: uint32 values in 0..255, one per tile row; ``bit``: ``tl.arange(0, 8)``):
    the set bits below each bit position, ``(rows, 8)`` int32, and the byte's popcount, ``(rows,)`` int32.

    Integer arithmetic on the whole byte (the bits spread to one nibble each, then one multiply sums
    every nibble prefix at once), so the per-slot work is one shift and one mask instead of an in-row
    scan and a subtraction.
    """
    x = (byte | (byte << 12)) & 0x000F000F
    x = (x | (x << 6)) & 0x03030303
    x = (x | (x << 3)) & 0x11111111  # bit j of the byte at bit 4j
    incl = x * 0x11111111  # nibble j: set bits at positions <= j (at most 8: no carry between nibbles)
    before = ((incl << 4)[:, None] >> (bit[None, :] * 4).to(tl.uint32)) & 15
    return before.to(tl.int32), (incl >> 28).to(tl.int32)


@triton.jit
def tile_ranks(bits_ptr, offsets_ptr, numel, SELECT_PRUNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ``BLOCK`` slots as a ``(BLOCK // 8, 8)`` tile: flat offsets, selected flags, compact ranks.

    One mask byte per tile row, so the 8 slots of a row sit in one thread: their in-row ranks and the
    row counts are register adds, and the only cross-thread scan is over ``BLOCK / 8`` row counts.
    """
    return tile_ranks_at(bits_ptr, offsets_ptr, numel, tl.program_id(0), SELECT_PRUNED, BLOCK)


@triton.jit
def tile_ranks_at(bits_ptr, offsets_ptr, numel, pid, SELECT_PRUNED: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`tile_ranks` of block ``pid`` of the mask (a multi-tensor kernel's program handles a block
    of one of several weights, so the block index is not its program id)."""
    byte_row = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    offs = pid * BLOCK + byte_row[:, None] * 8 + bit[None, :]
    byte_idx = pid * (BLOCK // 8) + byte_row
    byte = tl.load(bits_ptr + byte_idx, mask=byte_idx * 8 < numel, other=0).to(tl.int32)
    if not SELECT_PRUNED:
        byte = ~byte & 0xFF
    # Bits past ``numel`` only count toward ranks of slots past ``numel`` (never stored).
    count = _popcount8(byte)
    before = tl.load(offsets_ptr + pid) + tl.cumsum(count, axis=0) - count
    flag = (byte[:, None] >> bit[None, :]) & 1
    rank = before[:, None] + tl.cumsum(flag, axis=1) - flag
    flag = tl.where(offs < numel, flag, 0)
    return offs, flag != 0, rank


# (device, (n_blocks of each piece)) -> (program -> piece, program -> block of that piece), on the device.
_PROGRAM_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def program_table(device: torch.device, blocks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which piece and which of its blocks each program of a multi-tensor kernel handles (pieces of
    ``blocks`` blocks each); built once per set of piece sizes."""
    key = (device, blocks)
    hit = _PROGRAM_TABLES.get(key)
    if hit is None:
        counts = torch.tensor(blocks, dtype=torch.int64)
        item = torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32), counts)
        starts = torch.cumsum(counts, 0) - counts
        block = (torch.arange(int(counts.sum()), dtype=torch.int64) - starts.repeat_interleave(counts)).to(torch.int32)
        hit = _PROGRAM_TABLES[key] = (item.to(device), block.to(device))
        if len(_PROGRAM_TABLES) > 64:  # a bounded cache: models change their weight sets rarely
            _PROGRAM_TABLES.pop(next(iter(_PROGRAM_TABLES)))
    return hit


@triton.jit
def table_block_slots(row, numel, how, blk, BLOCK: tl.constexpr):
    """Block ``blk`` of one piece of a multi-tensor kernel (a row of its int64 table at ``row``): the
    slots' flat offsets, selected flags and compact ranks. ``how`` 0: every slot below ``numel`` (rank =
    offset); 1 / 2: the slots the bitmap whose address is ``row[4]`` marks pruned / active, ``row[5]``
    being the address of its block offsets. Laid out as :func:`tile_ranks`' tile either way."""
    if how == 0:
        byte_row = tl.arange(0, BLOCK // 8)
        bit = tl.arange(0, 8)
        offs = blk * BLOCK + byte_row[:, None] * 8 + bit[None, :]
        sel = offs < numel
        rank = offs
    else:
        bits_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
        offsets_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int32))
        if how == 1:
            offs, sel, rank = tile_ranks_at(bits_ptr, offsets_ptr, numel, blk, True, BLOCK)
        else:
            offs, sel, rank = tile_ranks_at(bits_ptr, offsets_ptr, numel, blk, False, BLOCK)
    return offs, sel, rank


@triton.jit
def _gather_kernel(src_ptr, bits_ptr, offsets_ptr, out_ptr, numel, SELECT_PRUNED: tl.constexpr, BLOCK: tl.constexpr):
    offs, sel, rank = tile_ranks(bits_ptr, offsets_ptr, numel, SELECT_PRUNED, BLOCK)
    vals = tl.load(src_ptr + offs, mask=sel, other=0)
    tl.store(out_ptr + rank, vals.to(out_ptr.dtype.element_ty), mask=sel)


def gather_bitmap(
    src: torch.Tensor, storage: torch.Tensor, n_selected: int, select_pruned: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """The selected slots of ``src`` (flattened), ascending, as a compact ``out_dtype`` vector."""
    check_launch_gather_bitmap(src, storage, n_selected)
    numel = src.numel()
    out = torch.empty(n_selected, dtype=out_dtype, device=src.device)
    if n_selected == 0 or numel == 0:
        return out
    offsets = cached_block_offsets(storage, numel, select_pruned)
    _gather_kernel[(offsets.numel(),)](
        src.reshape(-1), storage, offsets, out, numel, select_pruned, BLOCK, num_warps=NUM_WARPS
    )
    return out
