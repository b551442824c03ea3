"""Triton kernel for QRESU: dequantize packed codes and merge θ into the effective weight, in one pass.

Each program writes ``BLOCK`` consecutive slots of the effective weight (flat, row-major) as a
``(BLOCK // 8, 8)`` tile: one tile row is 8 slots, one mask byte, one 32-bit word of 4-bit codes and
one 16-byte store of bf16 output. It reads the packed codes once (half a byte per slot at 4 bits), the
block parameters (one scale and zero point per tile row, or per program when a whole program lies in
one block), and for pruned slots θ at the slot's rank among the pruned slots.

A code reads back by the weight's ``decode`` (:attr:`resu.tensors.quantized.QuantFormat.decode`):
affine ``(q - zero) * scale``; NF4 ``level[q] * scale``, the 16 levels loaded from a small table that
stays in cache; NF4 with double quantization first reads the block scale back from its 8-bit code,
``(c - zero2[g]) * scale2[g]`` with ``g`` the block's group of 256, in the same pass.

The θ rank of a pruned slot:

- bitmap masks: the rank is the block's first pruned index (``cached_block_offsets``, a per-block
  prefix sum computed once per mask), plus a scan of the tile rows' popcounts, plus the pruned bits
  before the slot in its mask byte (:func:`resu.compile.triton_bitmap.byte_prefix`: computed once
  per byte with integer arithmetic, then one shift and mask per slot);
- index masks (int32, sorted): a branch-free binary search over the index list gives the number of
  listed slots before each slot, which is the rank (pruned list) or ``slot - rank`` (active list); the
  list is small (these encodings are chosen only below 3.1% or above 96.9% sparsity) and stays in cache.

The kernel is bound by instruction issue before memory if a slot costs much more than ~20
instructions (an H100/H200 SM issues 128 per clock and must finish ~4 slots per clock to keep up with
HBM), so per slot the bitmap/affine path is: a shift and mask for the code, a convert, a subtract and
a multiply, a bit test and a shift/mask for the rank, a 64-bit address, the predicated θ load (whose
fallback is the dequantized value: no select) and half a bf16 pair conversion. Everything else is per
tile row or per program: the scale (per tile row, or once per program when the program lies in one
block), masks (none when the weight is a whole number of programs, per row when it is a whole number
of rows), the popcount and the scan. fp32 → bf16 is the hardware's rounding conversion (spelled out in
integer arithmetic only under the interpreter, whose cast truncates).

This module imports Triton; it is imported only by the CUDA kernel registration and by tests (on CPU
under ``TRITON_INTERPRET=1``). The reference is :func:`resu.compile.qlinear.dequant_merge_reference`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.launch_checks import check_launch_dequant_merge
from resu.compile.triton_bitmap import byte_prefix, cached_block_offsets
from resu.tensors import mask as mask_ops
from resu.tensors.quantized import DOUBLE_QUANT_GROUP, nf4_codebook


def _launch_setting(name: str, value, least: int) -> int:
    """``value`` if it is a power of two >= ``least`` (a launch setting), else a ValueError naming ``name``."""
    if not (type(value) is int and value >= least and value & (value - 1) == 0):
        raise ValueError(f"dequant_merge_triton: {name} must be a power of two >= {least}, got {value!r}")
    return value


def _setting_from_env(name: str, default: int, least: int) -> int:
    """A launch default from the environment, read once at import (a GPU sweep sets it per process)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return _launch_setting(name, int(raw) if raw.strip().isdigit() else raw, least)


# Slots per program and warps per program: 32 slots (four tile rows) per thread amortize the per-program
# work; tile rows are spread over the threads the way the output store wants them, so any pair with
# QBLOCK >= 256 * NUM_WARPS runs without a layout shuffle through shared memory. Override per call
# (``block=``, ``num_warps=``) or per process (RESU_QRESU_QBLOCK, RESU_QRESU_NUM_WARPS);
# ``benchmarks/gpu_dequant.py --sweep`` times the choices on a GPU: on an H200, 2048 × 2 warps had the best
# geometric mean over its 8 cases (0.898× a device copy's bandwidth, worst 0.815×; 1024 × 2: 0.867, 0.807).
QBLOCK = _setting_from_env("RESU_QRESU_QBLOCK", 2048, 16)
NUM_WARPS = _setting_from_env("RESU_QRESU_NUM_WARPS", 2, 1)

_ENCODING_IDS = {
    mask_ops.MaskEncoding.BITMAP.value: 0,
    mask_ops.MaskEncoding.PRUNED_INDICES.value: 1,
    mask_ops.MaskEncoding.ACTIVE_INDICES.value: 2,
}
_DECODE_IDS = {"affine": 0, "nf4": 1, "nf4_dq": 2}
DQ_GROUP = tl.constexpr(DOUBLE_QUANT_GROUP)

# SCALE_MODE: where a slot's block parameters are.
SCALE_TENSOR = 0  # one scale for the tensor
SCALE_ROW = 1  # one per tile row, located by (row, col) (rows and groups are multiples of 8 slots)
SCALE_SLOT = 2  # one per slot, located by (row, col)
SCALE_FLAT_ROW = 3  # groups tile each weight row exactly: block of slot i is i // GROUP_COLS, one per tile row
SCALE_FLAT_PROGRAM = 4  # as 3, and a group spans whole programs: one per program
# BOUNDS: which slots past the end are masked.
BOUNDS_NONE = 0  # the weight is a whole number of programs
BOUNDS_ROW = 1  # a whole number of tile rows: whole rows are masked
BOUNDS_SLOT = 2  # otherwise: every slot is masked


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
    """fp32 → bf16 rounding to nearest even, as ``torch.Tensor.to`` does on the CPU (NaN stays NaN).

    Spelled out in integer arithmetic for the interpreter, whose fp32 → bf16 cast truncates; compiled
    kernels use the hardware conversion instead (the same rounding, as torch's CUDA cast).
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
    SEARCH_STEPS: tl.constexpr, BOUNDS: tl.constexpr, CODE_WORDS: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A block of BLOCK slots as a (BLOCK // 8, 8) tile: one mask byte per row, as in tile_ranks.
    pid = tl.program_id(0)
    row = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    first = pid * BLOCK + row * 8  # each tile row's first slot
    offs = first[:, None] + bit[None, :]
    row_idx = pid * (BLOCK // 8) + row  # per-row loads: mask byte, code word
    if out_ptr.dtype.element_ty.primitive_bitwidth == 16:
        # A tile row of 16-bit outputs is one 16-byte store, and the store's layout gives each thread
        # whole rows, spread over the threads. Hiding row_idx's contiguity from the coalescer puts the
        # per-row loads in those same threads, instead of in runs of consecutive rows that would then be
        # shuffled through shared memory (one barrier each).
        row_idx = tl.max_contiguous(row_idx, 1)
    if BOUNDS == 0:  # constant masks: the loads and stores compile without predicates
        row_ok = tl.full((BLOCK // 8,), 1, tl.int1)
        ok = row_ok[:, None]
    elif BOUNDS == 1:
        row_ok = first < numel
        ok = row_ok[:, None]
    else:
        row_ok = first < numel
        ok = offs < numel
    if BITS == 4:
        if CODE_WORDS:  # the row's 8 codes are one aligned 32-bit word, low nibble first
            word = tl.load(q_ptr.to(tl.pointer_type(tl.uint32)) + row_idx, mask=row_ok, other=0)
            code = (word[:, None] >> (bit[None, :] * 4).to(tl.uint32)) & 15
        else:  # four bytes per row, split into nibbles: even slots low, odd high
            byte_offs = pid * (BLOCK // 2) + row[:, None] * 4 + tl.arange(0, 4)[None, :]
            packed = tl.load(q_ptr + byte_offs, mask=byte_offs * 2 < numel, other=0).to(tl.int32)
            code = tl.interleave(packed & 15, packed >> 4)
    else:
        code = tl.load(q_ptr + offs, mask=ok, other=0)
    code = code.to(tl.int32)
    if SCALE_MODE == 0:  # per tensor: one scale (affine only: NF4 is always grouped)
        s = tl.load(scale_ptr)
        z = tl.load(zero_ptr)
    elif SCALE_MODE == 4:  # the whole program lies in one block
        sidx = (pid * BLOCK) // GROUP_COLS
        s, z = _block_params(scale_ptr, zero_ptr, sidx, sidx >= 0, n_groups, DECODE)
    elif SCALE_MODE == 3:  # the block of slot i is i // GROUP_COLS; a tile row lies in one block
        sidx = first.to(tl.uint32) // GROUP_COLS  # unsigned: a shift for a power of 2
        s, z = _block_params(scale_ptr, zero_ptr, sidx, row_ok, n_groups, DECODE)
        s = s[:, None]
        z = z[:, None]
    elif SCALE_MODE == 1:  # the 8 slots of a tile row share a scale (groups and rows are multiples of 8)
        r = first // COLS  # COLS is a compile-time constant: a multiply and a shift, no division
        sidx = r * ROW_STRIDE + (first - r * COLS) // GROUP_COLS
        s, z = _block_params(scale_ptr, zero_ptr, sidx, row_ok, n_groups, DECODE)
        s = s[:, None]
        z = z[:, None]
    else:
        r = offs // COLS
        sidx = r * ROW_STRIDE + (offs - r * COLS) // GROUP_COLS
        s, z = _block_params(scale_ptr, zero_ptr, sidx, ok, n_groups, DECODE)
    if DECODE == 0:
        w = (code.to(tl.float32) - z) * s
    else:
        w = tl.load(lut_ptr + code) * s  # code < 16: always in the table
    if ENCODING == 0:
        byte = tl.load(mask_ptr + row_idx, mask=row_ok, other=0).to(tl.uint32)
        before, count = byte_prefix(byte, bit)
        # Rank of each row's first slot: the block's offset plus an exclusive scan of the row counts.
        # Bits past ``numel`` only count toward ranks of slots past ``numel`` (never stored).
        row_rank = tl.load(offsets_ptr + pid) + tl.cumsum(count, axis=0) - count
        theta_at = (theta_ptr + row_rank)[:, None] + before  # one 64-bit base per row, small offsets per slot
        pruned = (byte[:, None] & (1 << bit[None, :]).to(tl.uint32)) != 0  # a bit test per slot
        if BOUNDS == 2:
            pruned = pruned & ok
    else:
        below, listed = _count_below(mask_ptr, n_idx, offs, SEARCH_STEPS)
        if ENCODING == 1:
            pruned = listed & ok
            theta_at = theta_ptr + below
        else:
            pruned = (~listed) & ok
            theta_at = theta_ptr + (offs - below)
    if theta_ptr.dtype.element_ty == tl.float32 and w.dtype == tl.float32:  # no select: the masked load
        # keeps w where the slot is active (its fallback value)
        w = tl.load(theta_at, mask=pruned, other=w)
    else:
        w = tl.where(pruned, tl.load(theta_at, mask=pruned, other=0.0).to(tl.float32), w)
    if BF16_BY_HAND:
        tl.store(out_ptr + offs, _to_bf16_rtne(w), mask=ok)
    else:
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=ok)


def _interpreted(kernel) -> bool:
    """Whether ``kernel`` runs under Triton's interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


_BF16_CAST_BY_HAND = _interpreted(_dequant_merge_kernel)


def _scale_mode(cols: int, group_cols: int, row_stride: int, block: int) -> int:
    """Where the kernel finds each slot's block parameters (the SCALE_* constants above)."""
    if row_stride == 0:
        return SCALE_TENSOR
    if cols % group_cols == 0 and row_stride * group_cols == cols and group_cols % 8 == 0:
        return SCALE_FLAT_PROGRAM if group_cols % block == 0 else SCALE_FLAT_ROW
    return SCALE_ROW if cols % 8 == 0 and group_cols % 8 == 0 else SCALE_SLOT


class _Plan:
    """Everything a launch derives from the scalar arguments alone (grid, compile-time constants), made
    once per shape and format instead of on every call."""

    __slots__ = ("grid", "bitmap", "lut", "zero_empty", "n_groups", "scale_mode", "bounds", "code_words", "head",
                 "tail", "num_warps", "block")

    def __init__(self, encoding, rows, cols, bits, group_cols, row_stride, decode, out_dtype, block, num_warps,
                 aligned):
        numel = rows * cols
        enc = _ENCODING_IDS[mask_ops.MaskEncoding(encoding).value]
        dec = _DECODE_IDS[decode]
        self.grid = (cdiv(numel, block),)
        self.bitmap = enc == 0
        self.lut = dec != 0
        self.zero_empty = decode == "nf4"  # NF4 stores no zero points: any valid pointer stands in
        self.n_groups = -(-max(rows * row_stride, 1) // DOUBLE_QUANT_GROUP) if dec == 2 else 0
        self.scale_mode = _scale_mode(cols, group_cols, row_stride, block)
        self.bounds = BOUNDS_NONE if numel % block == 0 else BOUNDS_ROW if numel % 8 == 0 else BOUNDS_SLOT
        self.code_words = bits == 4 and aligned and numel % 8 == 0  # whole aligned words, none past the end
        self.head = (cols, group_cols, row_stride, self.scale_mode, bits, dec, enc)
        self.tail = (self.bounds, self.code_words, out_dtype == torch.bfloat16 and _BF16_CAST_BY_HAND, block)
        self.num_warps = num_warps
        self.block = block


_PLANS: dict[tuple, _Plan] = {}


def _plan_for(encoding, rows, cols, bits, group_cols, row_stride, decode, out_dtype, block, num_warps,
              aligned) -> _Plan:
    """The launch plan of these (checked) scalar arguments, cached."""
    key = (encoding, rows, cols, bits, group_cols, row_stride, decode, out_dtype, block, num_warps, aligned)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 4096:  # shapes come from a model's layers: a few dozen; never grow without bound
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(*key)
    return plan


_LUTS: dict[torch.device, torch.Tensor] = {}


def _codebook_on(device: torch.device) -> torch.Tensor:
    """The NF4 table on ``device``, made once per device (not once per launch)."""
    lut = _LUTS.get(device)
    if lut is None:
        lut = _LUTS[device] = nf4_codebook(device)
    return lut


def dequant_merge_triton(
    qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode,
    out_dtype, *, block=None, num_warps=None,
) -> torch.Tensor:
    """Effective QRESU weight ``(rows, cols)`` in ``out_dtype`` (see :func:`dequant_merge_reference`).

    ``block`` (slots per program, a power of two >= 16) and ``num_warps`` override :data:`QBLOCK` and
    :data:`NUM_WARPS` for this call (a sweep's knob; the op always uses the defaults).
    """
    check_launch_dequant_merge(
        qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode
    )
    block = QBLOCK if block is None else _launch_setting("block", block, 16)
    num_warps = NUM_WARPS if num_warps is None else _launch_setting("num_warps", num_warps, 1)
    out = torch.empty((rows, cols), dtype=out_dtype, device=qdata.device)
    numel = rows * cols
    if numel == 0:
        return out
    plan = _plan_for(encoding, rows, cols, bits, group_cols, row_stride, decode, out_dtype, block, num_warps,
                     qdata.data_ptr() % 4 == 0)
    if plan.bitmap:
        offsets, n_idx, steps = cached_block_offsets(storage, numel, True, plan.block), 0, 1
    else:
        offsets = storage  # unused: a valid pointer for the launch
        n_idx = storage.numel()
        steps = max(1, n_idx.bit_length())
    _dequant_merge_kernel[plan.grid](
        qdata, scale, scale if plan.zero_empty else zero, _codebook_on(qdata.device) if plan.lut else scale, theta,
        storage, offsets, out, numel, n_idx, plan.n_groups, *plan.head, steps, *plan.tail,
        num_warps=plan.num_warps,
    )
    return out
