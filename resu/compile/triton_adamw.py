"""Triton AdamW kernels: one math definition (:func:`adamw_math`), three ways to reach the slots.

- :func:`compact_adamw_triton_`: a compact vector (θ), every slot, a bool-mask subset or the slots whose
  int64 selection key is ≥ a threshold (read on device, no host sync); states sized like the vector.
- :func:`indexed_adamw_triton_`: k slots at given positions of a flat tensor; states sized k.
- :func:`bitmap_adamw_triton_`: the pruned (or active) slots of a dense weight under a bitmap mask,
  every one or those whose key is ≥ a threshold, found with :func:`resu.compile.triton_bitmap.tile_ranks`
  (no index tensor); states and keys compact, the gradient compact or weight-shaped.
- :func:`grouped_adamw_triton_`: every slot of many fp32 weights, one launch per kind, each a compact vector
  or the bitmap-selected slots of a dense weight (the per-parameter kernels above, one program table).

The math follows :func:`resu.compile.adamw_math.adamw_update_` (``torch.optim.AdamW``) operation by
operation, in fp32. :mod:`resu.optim.adamw_step` chooses between these kernels and the reference
once per step; tests run every kernel against it on CPU under ``TRITON_INTERPRET=1``. This module
imports Triton: import it lazily, only for CUDA tensors (or the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.triton_bitmap import BLOCK as BITMAP_BLOCK
from resu.compile.triton_bitmap import cached_block_offsets, program_table, tile_ranks, tile_ranks_at
from resu.compile.launch_checks import (
    check_launch_adamw_bitmap,
    check_launch_bitmap_key_adamw,
    check_launch_grouped_adamw,
    check_launch_indexed_adamw,
    check_launch_theta_adamw,
)

BLOCK = 1024
# Warps per program of the bitmap and grouped kernels (8 slots per thread at 1024 slots a program).
# Measured on an H200, one 11008×4096 weight at s = 0.5: the bitmap kernel 0.344 ms at 2 warps, 0.262
# at 4, 0.282 at 8; the compact θ path 0.215, 0.191, 0.177 (benchmarks/gpu_optim.py's rows).
NUM_WARPS = 4
# Blocks of one weight that a program of the grouped kernel steps (see _grouped_kernel). Measured on an
# H200, one RESU 11008×4096 weight at s = 0.5: 0.368 ms at 1 block a program, 0.33–0.34 at 2 and 4,
# 0.324–0.325 at 8 (the one-weight kernel: 0.257).
BLOCKS_PER_PROGRAM = 8

# How the compact kernel picks its slots.
SELECT_ALL, SELECT_MASK, SELECT_KEY = 0, 1, 2


@triton.jit
def adamw_math(w, g, m, v, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    """One AdamW step on fp32 registers, in the operation order of ``adamw_update_``."""
    w = w * decay
    m = m + (g - m) * (1 - beta1)
    v = v * beta2 + g * g * (1 - beta2)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    w = w - step_size * (m / denom)
    return w, m, v


@triton.jit
def _load_f32(ptr, mask):
    """``ptr`` as fp32, where ``mask`` (None: everywhere; a load with no mask can use vector loads)."""
    if mask is None:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.load(ptr, mask=mask, other=0).to(tl.float32)


@triton.jit
def _step_slots(
    w_ptr, w_offs, g_ptr, g_offs, m_ptr, v_ptr, s_offs, sel,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE: tl.constexpr,
):
    """Load, step and store the ``sel`` slots (None: every slot): weight at ``w_offs``, gradient at
    ``g_offs``, states at ``s_offs``."""
    w = _load_f32(w_ptr + w_offs, sel)
    g = _load_f32(g_ptr + g_offs, sel)
    if MAXIMIZE:
        g = -g
    m = _load_f32(m_ptr + s_offs, sel)
    v = _load_f32(v_ptr + s_offs, sel)
    w, m, v = adamw_math(w, g, m, v, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
    tl.store(w_ptr + w_offs, w.to(w_ptr.dtype.element_ty), mask=sel)
    tl.store(m_ptr + s_offs, m.to(m_ptr.dtype.element_ty), mask=sel)
    tl.store(v_ptr + s_offs, v.to(v_ptr.dtype.element_ty), mask=sel)


@triton.jit
def _step_compact_block(
    w_ptr, g_ptr, m_ptr, v_ptr, start, numel,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Every slot of ``[start, start + BLOCK)`` of a compact vector (and of its gradient and states).

    A whole block is loaded without a mask, so the compiler can use vector loads and stores (a mask that
    may change inside a vector forbids them); only the last, partial block of a vector is masked."""
    offs = start + tl.arange(0, BLOCK)
    if start <= numel - BLOCK:  # (not start + BLOCK: it can pass 2^31 and wrap)
        _step_slots(w_ptr, offs, g_ptr, offs, m_ptr, v_ptr, offs, None,
                    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE)
    else:
        _step_slots(w_ptr, offs, g_ptr, offs, m_ptr, v_ptr, offs, offs < numel,
                    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE)


@triton.jit
def _step_weight_tile(
    w_ptr, offs, in_bounds, g_ptr, g_offs, m_ptr, v_ptr, s_offs, sel,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE: tl.constexpr, WHOLE_TILE: tl.constexpr,
):
    """Step the ``sel`` slots of one tile of a dense weight (states and gradient at their own offsets).

    With ``WHOLE_TILE`` the weight is read and written over the whole tile (``in_bounds``: None for a
    full tile), the unselected slots written back with the bits they were read with: a mask bit per
    slot would forbid vector loads and stores. Chosen by :func:`whole_tiles_pay` (when enough slots are
    selected that nearly every 32-byte sector holds one, the traffic is about the same), and only for
    a weight no other program of the launch writes (the caller's guarantee)."""
    if not WHOLE_TILE:
        _step_slots(w_ptr, offs, g_ptr, g_offs, m_ptr, v_ptr, s_offs, sel,
                    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE)
    else:
        if in_bounds is None:
            w_old = tl.load(w_ptr + offs)
        else:
            w_old = tl.load(w_ptr + offs, mask=in_bounds, other=0)
        g = _load_f32(g_ptr + g_offs, sel)
        if MAXIMIZE:
            g = -g
        m = _load_f32(m_ptr + s_offs, sel)
        v = _load_f32(v_ptr + s_offs, sel)
        w, m, v = adamw_math(w_old.to(tl.float32), g, m, v, decay, beta1, beta2, eps, step_size,
                             bias_correction2_sqrt)
        tl.store(w_ptr + offs, tl.where(sel, w.to(w_ptr.dtype.element_ty), w_old), mask=in_bounds)
        tl.store(m_ptr + s_offs, m.to(m_ptr.dtype.element_ty), mask=sel)
        tl.store(v_ptr + s_offs, v.to(v_ptr.dtype.element_ty), mask=sel)


def adamw_scalars(step: int, lr: float, beta1: float, beta2: float, weight_decay: float) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction) of one AdamW step."""
    return 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


@triton.jit
def _compact_kernel(
    theta_ptr, g_ptr, m_ptr, v_ptr, sel_ptr, thr_ptr, n,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    SELECT: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sel = offs < n
    if SELECT == 1:
        sel = sel & (tl.load(sel_ptr + offs, mask=sel, other=0) != 0)
    if SELECT == 2:
        sel = sel & (tl.load(sel_ptr + offs, mask=sel, other=-1) >= tl.load(thr_ptr))
    _step_slots(theta_ptr, offs, g_ptr, offs, m_ptr, v_ptr, offs, sel,
                decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE)


def compact_adamw_triton_(
    theta, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, maximize,
    select_mode: int = SELECT_ALL, selector=None, threshold=None,
) -> None:
    """AdamW on a compact θ vector: every slot, slots where the bool ``selector`` is True
    (``SELECT_MASK``), or slots whose int64 key in ``selector`` is ≥ the 0-d ``threshold`` (``SELECT_KEY``)."""
    check_launch_theta_adamw(theta, grad, exp_avg, exp_avg_sq, select_mode, selector, threshold)
    n = theta.numel()
    if n == 0:
        return
    decay, step_size, bc2 = adamw_scalars(step, lr, beta1, beta2, weight_decay)
    if select_mode == SELECT_MASK:
        selector = selector.view(torch.uint8)
    selector = grad if selector is None else selector  # an unused pointer when SELECT_ALL
    threshold = selector if threshold is None else threshold
    _compact_kernel[(cdiv(n, BLOCK),)](
        theta, grad, exp_avg, exp_avg_sq, selector, threshold, n,
        decay, beta1, beta2, eps, step_size, bc2, select_mode, maximize, BLOCK,
    )


@triton.jit
def _indexed_kernel(
    param_ptr, pidx_ptr, g_ptr, gidx_ptr, m_ptr, v_ptr, k,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < k
    pidx = tl.load(pidx_ptr + offs, mask=inb, other=0)
    gidx = tl.load(gidx_ptr + offs, mask=inb, other=0)
    _step_slots(param_ptr, pidx, g_ptr, gidx, m_ptr, v_ptr, offs, inb,
                decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE)


def indexed_adamw_triton_(
    param, param_index, grad, grad_index, exp_avg, exp_avg_sq, step, *,
    lr, beta1, beta2, eps, weight_decay, maximize,
) -> None:
    """AdamW on ``param.view(-1)[param_index]`` with gradient ``grad[grad_index]``; states sized k."""
    check_launch_indexed_adamw(param, param_index, grad, grad_index, exp_avg, exp_avg_sq)
    k = param_index.numel()
    if k == 0:
        return
    decay, step_size, bc2 = adamw_scalars(step, lr, beta1, beta2, weight_decay)
    _indexed_kernel[(cdiv(k, BLOCK),)](
        param.view(-1), param_index, grad, grad_index, exp_avg, exp_avg_sq, k,
        decay, beta1, beta2, eps, step_size, bc2, maximize, BLOCK,
    )


@triton.jit
def _bitmap_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, key_ptr, thr_ptr, bits_ptr, offsets_ptr, numel,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    SELECT_PRUNED: tl.constexpr, GRAD_COMPACT: tl.constexpr, BY_KEY: tl.constexpr,
    MAXIMIZE: tl.constexpr, WHOLE_TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, sel, rank = tile_ranks(bits_ptr, offsets_ptr, numel, SELECT_PRUNED, BLOCK)  # rank: compact index
    if BY_KEY:
        sel = sel & (tl.load(key_ptr + rank, mask=sel, other=-1) >= tl.load(thr_ptr))
    if GRAD_COMPACT:
        g_offs = rank
    else:
        g_offs = offs
    # One weight per launch: no other program writes this tile, so it may be read and written whole.
    if tl.program_id(0) * BLOCK <= numel - BLOCK:
        _step_weight_tile(w_ptr, offs, None, g_ptr, g_offs, m_ptr, v_ptr, rank, sel,
                          decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE, WHOLE_TILE)
    else:
        _step_weight_tile(w_ptr, offs, offs < numel, g_ptr, g_offs, m_ptr, v_ptr, rank, sel,
                          decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE, WHOLE_TILE)


def bitmap_adamw_triton_(
    weight, grad, exp_avg, exp_avg_sq, storage, select_pruned: bool, step, *,
    lr, beta1, beta2, eps, weight_decay, maximize, n_selected: int, keys=None, threshold=None,
) -> None:
    """AdamW in place on the selected slots of a bitmap-masked dense ``weight``: every pruned
    (``select_pruned``) or active slot, or with ``keys`` only those whose key is ≥ the 0-d ``threshold``.

    ``n_selected`` is the mask's count of selected slots (``n_pruned``, or ``numel - n_pruned`` for the
    active ones): states and ``keys`` are compact (that many, ascending flat order); ``grad`` is compact
    or weight-shaped. The kernel writes states at each slot's bitmap rank, so their lengths are checked
    against the count before launch."""
    if keys is None:
        check_launch_adamw_bitmap(weight, grad, exp_avg, exp_avg_sq, storage, n_selected)
    else:
        check_launch_bitmap_key_adamw(weight, grad, exp_avg, exp_avg_sq, storage, keys, threshold, n_selected)
    numel = weight.numel()
    if numel == 0 or exp_avg.numel() == 0:
        return
    offsets = cached_block_offsets(storage, numel, select_pruned)
    decay, step_size, bc2 = adamw_scalars(step, lr, beta1, beta2, weight_decay)
    by_key = keys is not None
    keys = keys if by_key else storage  # unused pointers without keys
    threshold = threshold if by_key else storage
    _bitmap_kernel[(offsets.numel(),)](
        weight.view(-1), grad.reshape(-1), exp_avg, exp_avg_sq, keys, threshold, storage, offsets, numel,
        decay, beta1, beta2, eps, step_size, bc2,
        select_pruned, grad.numel() != numel, by_key, maximize, not by_key and whole_tiles_pay(n_selected, numel),
        BITMAP_BLOCK, num_warps=NUM_WARPS,
    )


# ------------------------------------------------------------------ many weights, one launch per kind
# The grouped kernel's int64 table: one row per weight, pointers to its weight (or θ), gradient, exp_avg,
# exp_avg_sq, mask bytes and block offsets (the weight's, unread for a compact vector), then its element
# count and kind (unread: a launch's kind is a compile-time constant). A program reads its weight's row,
# then steps BLOCKS_PER_PROGRAM blocks of it.
_ROW = 8
# Kinds: where a weight's slots live (low bits), and whether its gradient is weight-shaped (GRAD_DENSE).
KIND_COMPACT, KIND_BITMAP_PRUNED, KIND_BITMAP_ACTIVE, GRAD_DENSE = 0, 1, 2, 4


@triton.jit
def _table_pointer(row, column, ALIGNED: tl.constexpr):
    """Column ``column`` of a table row as an fp32 pointer; ``ALIGNED``: the host checked that every
    pointer of the table is 16-byte aligned, which the compiler needs to know to use vector accesses."""
    ptr = tl.load(row + column).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _grouped_kernel(
    table_ptr, scalars_ptr, prog_item_ptr, prog_block_ptr,
    decay, beta1, beta2, eps, KIND: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    WHOLE_TILES: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, ROW: tl.constexpr,
):
    pid = tl.program_id(0)
    item = tl.load(prog_item_ptr + pid)
    first = tl.load(prog_block_ptr + pid) * BLOCKS_PER_PROGRAM
    row = table_ptr + item.to(tl.int64) * ROW
    w_ptr = _table_pointer(row, 0, ALIGNED)
    g_ptr = _table_pointer(row, 1, ALIGNED)
    m_ptr = _table_pointer(row, 2, ALIGNED)
    v_ptr = _table_pointer(row, 3, ALIGNED)
    numel = tl.load(row + 6)
    bits_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))  # a bitmap kind's mask and block offsets
    offsets_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int32))
    step_size = tl.load(scalars_ptr + item * 2)
    bias_correction2_sqrt = tl.load(scalars_ptr + item * 2 + 1)
    # The reads above are a chain of dependent loads before any slot can be read; a program steps
    # several blocks so that the chain is paid once for them. (Read here, not per block: after a
    # block's stores the compiler must assume the table changed and read it again.)
    for j in tl.static_range(BLOCKS_PER_PROGRAM):
        blk = first + j
        if blk.to(tl.int64) * BLOCK < numel:  # int64: past the last block, blk * BLOCK may pass 2^31
            _grouped_block(w_ptr, g_ptr, m_ptr, v_ptr, bits_ptr, offsets_ptr, numel, blk,
                           decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, KIND, MAXIMIZE,
                           WHOLE_TILES, BLOCK)


@triton.jit
def _grouped_block(
    w_ptr, g_ptr, m_ptr, v_ptr, bits_ptr, offsets_ptr, numel, blk,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    KIND: tl.constexpr, MAXIMIZE: tl.constexpr, WHOLE_TILES: tl.constexpr, BLOCK: tl.constexpr,
):
    """Block ``blk`` of one weight of the grouped kernel."""
    # The kind is a compile-time constant (one launch per kind present): a kernel holding every kind's
    # code runs at the register use of the largest, and offsets that flow out of a run-time branch lose
    # what the compiler knows of their contiguity, and with it the vector accesses.
    if (KIND & 3) == 0:  # KIND_COMPACT
        _step_compact_block(w_ptr, g_ptr, m_ptr, v_ptr, blk * BLOCK, numel,
                            decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE, BLOCK)
    else:
        offs, sel, rank = tile_ranks_at(bits_ptr, offsets_ptr, numel, blk, (KIND & 3) == 1, BLOCK)
        if (KIND & 4) != 0:  # GRAD_DENSE
            g_offs = offs
        else:
            g_offs = rank
        # Tiles may be written whole: a launch steps each weight once (checked before launch).
        if blk * BLOCK <= numel - BLOCK:
            _step_weight_tile(w_ptr, offs, None, g_ptr, g_offs, m_ptr, v_ptr, rank, sel,
                              decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE, WHOLE_TILES)
        else:
            _step_weight_tile(w_ptr, offs, offs < numel, g_ptr, g_offs, m_ptr, v_ptr, rank, sel,
                              decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE, WHOLE_TILES)


def pointers_aligned(items) -> bool:
    """Whether every weight, gradient and state pointer of ``items`` is 16-byte aligned: the compiler
    can then use vector accesses, which a pointer read from the kernel's table cannot show it."""
    return all(t.data_ptr() % 16 == 0 for item in items for t in item[1:5])


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting for the device queue (pinned, non-blocking)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def grouped_adamw_triton_(items, *, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    """One AdamW step on every trainable slot of several fp32 weights: one launch per kind present (and
    per weight-access path, :func:`whole_tiles_pay`).

    ``items``: (kind, holder, grad, exp_avg, exp_avg_sq, step, storage, n_selected) per weight; ``kind``
    is ``KIND_COMPACT`` (``holder`` is a compact vector, ``storage`` None) or ``KIND_BITMAP_PRUNED`` /
    ``KIND_BITMAP_ACTIVE`` (the slots of the dense ``holder`` that the bitmap ``storage`` selects), plus
    ``GRAD_DENSE`` when ``grad`` is weight-shaped; a weight appears at most once per kind. Each weight
    keeps its own ``step`` (bias correction); the math and the scalars are those of the per-parameter
    kernels. The results are theirs bitwise under the interpreter; compiled for a GPU, the compiler may
    contract multiply-adds into FMAs differently in the two kernels, so they can differ by rounding
    (measured: up to ~30 ulp of a weight on an H200).
    """
    check_launch_grouped_adamw(items)
    launches: dict[tuple[int, bool], list] = {}
    for item in items:
        kind, holder, n_selected = item[0], item[1], item[7]
        if holder.numel() and item[3].numel():
            whole = kind & 3 != KIND_COMPACT and whole_tiles_pay(n_selected, holder.numel())
            launches.setdefault((kind, whole), []).append(item)
    for (kind, whole), same in launches.items():
        _grouped_launch(kind, whole, same, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)


def whole_tiles_pay(n_selected: int, numel: int) -> bool:
    """Whether the kernels read and write a bitmap-masked weight over whole tiles (vector accesses)
    rather than at its selected slots only: when at least a quarter of the slots are selected. A
    32-byte sector holds 8 fp32 slots; at a random quarter of them selected, 90% of sectors hold one, so
    the whole tile costs at most about 10% more traffic than the masked accesses, and far less time;
    at 2% (a SPARSE weight's active slots at s = 0.98) only 15% of sectors do, and whole tiles would
    move six times the bytes."""
    return 4 * n_selected >= numel


def _grouped_launch(kind, whole_tiles, items, *, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    """One launch of the grouped kernel over ``items``, all of ``kind``."""
    table, scalars, blocks = [], [], []
    for _kind, holder, grad, exp_avg, exp_avg_sq, step, storage, _n in items:
        numel = holder.numel()
        _, step_size, bc2 = adamw_scalars(step, lr, beta1, beta2, weight_decay)
        if kind & 3 == KIND_COMPACT:
            bits = offsets = holder.data_ptr()  # unread
            n_blocks = cdiv(numel, BITMAP_BLOCK)
        else:
            off = cached_block_offsets(storage, numel, kind & 3 == KIND_BITMAP_PRUNED)
            bits, offsets, n_blocks = storage.data_ptr(), off.data_ptr(), off.numel()
        table += [holder.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), bits, offsets,
                  numel, kind]
        scalars += [step_size, bc2]
        blocks.append(cdiv(n_blocks, BLOCKS_PER_PROGRAM))
    device = items[0][1].device
    prog_item, prog_block = program_table(device, tuple(blocks))
    _grouped_kernel[(prog_item.numel(),)](
        _to_device(table, torch.int64, device), _to_device(scalars, torch.float32, device), prog_item, prog_block,
        1 - lr * weight_decay, beta1, beta2, eps, kind, maximize, pointers_aligned(items), whole_tiles,
        BITMAP_BLOCK, BLOCKS_PER_PROGRAM, _ROW, num_warps=NUM_WARPS,
    )
