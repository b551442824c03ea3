"""Triton kernels of RESU-Selective's selection: the selection keys of a gradient, the fused
EMA/consistency/eligibility pass, and the exact k-th-largest key select behind the two thresholds. The
AdamW steps on the selected slots are in :mod:`resu.compile.triton_adamw`.

Selection keys (see :mod:`resu.optim.consistency`) rank θ slots by |g| with ties broken by the lower
index: ``key = bits(|g| as fp32) << 32 | (2³² − 1 − index)``, an int64 that is unique per slot and
ordered like (|g| descending, index ascending). A selection is then "key ≥ threshold", with the
threshold a 0-d device tensor read by the kernel, so no host sync is needed between passes.

**Exact k-th largest key by sample select** (:func:`kth_largest_key_triton`, and fused into the
consistency pass by :func:`consistency_select_triton`). Why not a radix select: a digit histogram of
all n keys costs, on the Triton the GPUs run (3.6, whose ``tl.histogram`` is a ballot per bit plus a
popcount per bin), work proportional to the bin count for every key, and the top digits of float keys
fall in a handful of bins (|g| spans a few binades), so each pass over 180 MB of keys (n = 22.5 M)
either resolves few bits or is compute-bound: two selects of six such passes took 11.9 ms on an H200,
against 2.25 ms for two ``torch.topk``. The sample select reads the keys once, and every step is
exact whatever the sample; the sample only decides how much work the small steps do:

1. ``_prepare_kernel`` gathers m keys (one per stratum of n/m slots, at a hashed offset; m ≤ 8192)
   and zeroes the counters; ``_sample_rank_kernel`` ranks the sample by counting (m² comparisons
   over m/32 programs, one 32-bit comparison per pair for selection keys). The sampled keys of rank
   j_lo … j_hi around the answer's expected rank k·m/n become the *splitters*: the window
   [lo, hi] = [sample j_hi, sample j_lo] holds the answer unless the sample is off by more than a
   Bernstein bound on its rank (probability below 2·e⁻²⁰ per select, whatever the keys: they are
   distinct), and its W + 1 buckets between consecutive splitters hold about n/m keys each.
2. One pass over the keys (``_window_pass_kernel``, or fused into ``_consistency_select_kernel``,
   which computes the keys anyway): counts the valid keys (≥ 0) and those above hi, appends the keys
   in [lo, hi] to a window buffer (one atomic per program for the base, a prefix sum within), and
   counts them per bucket (binary search over the splitters, one atomic per windowed key on
   counters 128 bytes apart; the window holds 5–10% of the keys).
3. ``_extract_kernel``: every program finds the bucket holding the answer from the bucket counts,
   and copies that bucket's keys (≈ 2n/m) from the window buffer to a small buffer.
4. ``_final_kernel``: ranks the small buffer by counting; the key of rank r' (the answer's rank in
   its bucket) is the answer. When the window missed or a buffer overflowed, program 0 finds the
   answer alone by an 8-pass radix select over all keys: exact, slow (tens of ms at n = 22.5 M), and
   not expected to run on any real input.

For n = 22.5 M int64 keys (m = 8192): one read of the keys (180 MB), the window buffer written and
read once (~1.6 M keys, 13 MB), and a few hundred kB of samples, splitters, counters and small
buffer; five launches, no host sync. Fused into the consistency pass (``select_impl`` "fused"), both
thresholds' windows ride in the pass that reads g, m, v and writes m, v and the keys anyway (28 B per
slot; the windows add ~120 instructions per slot to its ~55, under the ~230 that 28 B take at HBM
speed), the selection-keys kernel is no longer needed, and both thresholds take five launches in all
(prepare, rank, the pass, extract, final) where top-k took two sorts.

Each kernel has a plain-PyTorch reference in :mod:`resu.optim.consistency`; tests run them on CPU under
``TRITON_INTERPRET=1``. This module imports Triton: import it lazily, only for CUDA tensors.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from resu.compile.launch_checks import check_launch_consistency_pass
from resu.optim.consistency import SamplePlan, sample_plan

BLOCK = 1024

# Sample select tiles: samples gathered (and counters zeroed) per program; keys per program of the
# window pass, of the fused consistency pass and of the extraction; windowed keys binary-searched at a
# time; samples (small-buffer keys) ranked per program and compared per step; keys per step of the
# single-program fallback; bucket counters 16 int64 apart (one 128-byte line each), so the windowed
# keys' atomics spread over many L2 lines.
PREPARE_BLOCK = 1024
WINDOW_BLOCK = 4096
FUSED_BLOCK = 2048
EXTRACT_BLOCK = 2048
SUB = 256
RANK_ROWS = 32
RANK_COLS = 128
FALLBACK_BLOCK = 2048
PAD = 16

# Fields of the int64 state of one select (STATE_STRIDE apart for the two selects of a fused call).
STATE_STRIDE = 16
N_VALID, N_ABOVE, N_WINDOW, N_SMALL, RANK2, BUCKET, RESULT, N_FLAG_ABOVE, N_FLAG_GE, THRESHOLD = range(10)
_N_VALID, _N_ABOVE, _N_WINDOW, _N_SMALL = (tl.constexpr(i) for i in (N_VALID, N_ABOVE, N_WINDOW, N_SMALL))
_RANK2, _BUCKET, _RESULT = (tl.constexpr(i) for i in (RANK2, BUCKET, RESULT))
_N_FLAG_ABOVE, _N_FLAG_GE = tl.constexpr(N_FLAG_ABOVE), tl.constexpr(N_FLAG_GE)
_KEY_BITS = tl.constexpr(9223372036854775807)  # clears the flag bit of a window-buffer entry


@triton.jit
def _selection_key(g, offs):
    """int64 key ordering slots by |g| descending, then index ascending (unique per slot)."""
    bits = tl.abs(g).to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (4294967295 - offs.to(tl.int64))


@triton.jit
def _ema_step(g, m, v, m_ptr, v_ptr, beta, one_minus_beta, delta):
    """EMAs after one step, rounded to their storage dtypes, and C from the rounded values (as the
    reference computes C from the stored EMAs)."""
    m = (m * beta + g * one_minus_beta).to(m_ptr.dtype.element_ty)
    v = (v * beta + tl.abs(g) * one_minus_beta).to(v_ptr.dtype.element_ty)
    c = tl.abs(m.to(tl.float32)) / (v.to(tl.float32) + delta)
    return m, v, c


@triton.jit
def _ema_pass(g_ptr, m_ptr, v_ptr, n, pid, beta, one_minus_beta, delta, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``pid`` of the consistency pass: the EMAs stepped and stored; returns the slots' offsets,
    in-bounds flags, C values and selection keys."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=inb, other=0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb, other=0).to(tl.float32)
    m, v, c = _ema_step(g, m, v, m_ptr, v_ptr, beta, one_minus_beta, delta)
    tl.store(m_ptr + offs, m, mask=inb)
    tl.store(v_ptr + offs, v, mask=inb)
    return offs, inb, c, _selection_key(g, offs)


@triton.jit
def _keys_kernel(g_ptr, key_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0).to(tl.float32)
    tl.store(key_ptr + offs, _selection_key(g, offs), mask=inb)


def selection_keys_triton(grad: torch.Tensor) -> torch.Tensor:
    """Selection keys of a compact gradient vector (int64, one per slot)."""
    n = grad.numel()
    keys = torch.empty(n, dtype=torch.int64, device=grad.device)
    if n:
        _keys_kernel[(triton.cdiv(n, BLOCK),)](grad, keys, n, BLOCK)
    return keys


@triton.jit
def _consistency_kernel(
    g_ptr, m_ptr, v_ptr, key_ptr, screen_ptr, part_c_ptr, part_n_ptr, n,
    beta, one_minus_beta, delta, tau, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, inb, c, key = _ema_pass(g_ptr, m_ptr, v_ptr, n, pid, beta, one_minus_beta, delta, MAXIMIZE, BLOCK)
    eligible = (c > tau) & (key >= tl.load(screen_ptr)) & inb
    tl.store(key_ptr + offs, tl.where(eligible, key, -1), mask=inb)
    tl.store(part_c_ptr + pid, tl.sum(tl.where(inb, c, 0.0), axis=0))
    tl.store(part_n_ptr + pid, tl.sum(eligible.to(tl.int32), axis=0))


def consistency_pass_triton_(
    grad: torch.Tensor, ema_m: torch.Tensor, ema_v: torch.Tensor, keys: torch.Tensor,
    screen_threshold: torch.Tensor, *, beta: float, delta: float, tau: float, maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA update, consistency and eligibility in one pass; ``keys`` is overwritten with the keys of
    the eligible slots (P_mag ∩ P_con) and −1 elsewhere. Returns (ΣC, |P_mag ∩ P_con|) as 0-d tensors."""
    check_launch_consistency_pass(grad, ema_m, ema_v, keys, screen_threshold)
    n = grad.numel()
    n_blocks = max(1, triton.cdiv(n, BLOCK))
    alloc = torch.empty if n else torch.zeros  # every program writes its own partial
    part_c = alloc(n_blocks, dtype=torch.float32, device=grad.device)
    part_n = alloc(n_blocks, dtype=torch.int32, device=grad.device)
    if n:
        _consistency_kernel[(n_blocks,)](
            grad, ema_m, ema_v, keys, screen_threshold, part_c, part_n, n,
            beta, 1 - beta, delta, tau, maximize, BLOCK,
        )
    return part_c.sum(), part_n.sum()


# ------------------------------------------------------------------ exact k-th largest key (sample select)
@triton.jit
def _sample_position(j, n, LOG_M: tl.constexpr, ALL: tl.constexpr):
    """Slot of sample j: one per stratum [j·n/m, (j+1)·n/m) (m = 2^LOG_M), at a hashed offset in it;
    slot j when every slot is sampled (ALL). Shifts and a multiply, no division. Mirrored by
    ``consistency.sample_positions``."""
    j = j.to(tl.int64)
    if ALL:
        pos = j
    else:
        start = (j * n) >> LOG_M
        length = (((j + 1) * n) >> LOG_M) - start
        h = (j * 2654435761 + 1013904223) & 4294967295
        h = h ^ (h >> 15)
        pos = start + ((h * length) >> 32)
    return pos


@triton.jit
def _sample_keys(j, valid, n, src0, src1, src2, beta, one_minus_beta, delta, tau,
                 SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr, LOG_M: tl.constexpr, ALL: tl.constexpr):
    """(keys, codes) of samples ``j``. SOURCE 0: read from ``src0`` (keys); 1: the selection key of the
    gradient ``src0``; 2: that key where C > τ after this step's EMA update (EMAs ``src1``, ``src2``),
    else −1. A −1 becomes −1 − j, so the samples are distinct and rank uniquely. Codes: the key's high
    half (|g| bits) as int32, −1 for a −1 key."""
    pos = _sample_position(j, n, LOG_M, ALL)
    if SOURCE == 0:
        key = tl.load(src0 + pos, mask=valid, other=-1)
    else:
        g = tl.load(src0 + pos, mask=valid, other=0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        key = _selection_key(g, pos)
        if SOURCE == 2:
            mm = tl.load(src1 + pos, mask=valid, other=0).to(tl.float32)
            vv = tl.load(src2 + pos, mask=valid, other=0).to(tl.float32)
            _, _, c = _ema_step(g, mm, vv, src1, src2, beta, one_minus_beta, delta)
            key = tl.where(c > tau, key, -1)
    kept = key >= 0
    return tl.where(kept, key, -1 - j.to(tl.int64)), tl.where(kept, (key >> 32).to(tl.int32), -1)


@triton.jit
def _prepare_stage(pid, src0, src1, src2, n, m, beta, one_minus_beta, delta, tau, keys_ptr, codes_ptr,
                   SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr, LOG_M: tl.constexpr, ALL: tl.constexpr,
                   BLOCK: tl.constexpr):
    j = pid * BLOCK + tl.arange(0, BLOCK)
    if pid * BLOCK < m:
        key, code = _sample_keys(j, j < m, n, src0, src1, src2, beta, one_minus_beta, delta, tau, SOURCE, MAXIMIZE,
                                 LOG_M, ALL)
        tl.store(keys_ptr + j, key, mask=j < m)
        tl.store(codes_ptr + j, code, mask=j < m)


@triton.jit
def _prepare_kernel(src0, src1, src2, n, m, beta, one_minus_beta, delta, tau, work_ptr, work_size,
                    keys0, codes0, keys1, codes1,
                    SOURCE0: tl.constexpr, SOURCE1: tl.constexpr, TWO: tl.constexpr, MAXIMIZE: tl.constexpr,
                    LOG_M: tl.constexpr, ALL: tl.constexpr, BLOCK: tl.constexpr):
    """Zero the counters and state, and gather the samples once (keys and codes, per select), so the
    ranking programs read them contiguously instead of each gathering every sample again."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(work_ptr + offs, tl.zeros([BLOCK], dtype=tl.int64), mask=offs < work_size)
    _prepare_stage(pid, src0, src1, src2, n, m, beta, one_minus_beta, delta, tau, keys0, codes0,
                   SOURCE0, MAXIMIZE, LOG_M, ALL, BLOCK)
    if TWO:
        _prepare_stage(pid, src0, src1, src2, n, m, beta, one_minus_beta, delta, tau, keys1, codes1,
                       SOURCE1, MAXIMIZE, LOG_M, ALL, BLOCK)


@triton.jit
def _rank_stage(pid, n, m, j_lo, j_hi, split_ptr, keys_ptr, codes_ptr,
                CHECK: tl.constexpr, LOG_M: tl.constexpr, ALL: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """Rank R samples among all m by counting the larger ones; those of rank j_lo … j_hi become
    splitters ``split[rank − j_lo]`` (descending). C is a multiple of R.

    Selection keys at increasing slots (the sampled slots increase with the sample index) order like
    their int32 high halves with ties to the lower sample index, so a pair costs one 32-bit comparison
    (outside the chunk that holds these rows, where "lower index" is the same for the whole chunk).
    Keys read from memory (CHECK) take that path when every sampled key is such a key (checked
    first), and compare as int64 otherwise: the ranks are exact either way."""
    row0 = pid * R
    if row0 < m:
        i = row0 + tl.arange(0, R)
        mine = tl.load(keys_ptr + i, mask=i < m, other=-1)
        mine_code = tl.load(codes_ptr + i, mask=i < m, other=-1)
        if CHECK:
            fits = 1
            for start in range(0, m, C):
                j = start + tl.arange(0, C)
                key = tl.load(keys_ptr + j, mask=j < m, other=-1)
                at_slot = (key & 4294967295) == 4294967295 - _sample_position(j, n, LOG_M, ALL)
                fits = tl.minimum(fits, tl.min(((key < 0) | at_slot).to(tl.int32), axis=0))
            fits = fits > 0
        else:
            fits = True  # keys made from the gradient
        larger = tl.zeros([R, C], dtype=tl.int32)
        if fits:
            for start in range(0, m, C):
                j = start + tl.arange(0, C)
                other_code = tl.load(codes_ptr + j, mask=j < m, other=-2)  # below every code
                if (start <= row0) & (row0 < start + C):
                    earlier = (j[None, :] < i[:, None]).to(tl.int32)
                    larger += (other_code[None, :] > mine_code[:, None] - earlier).to(tl.int32)
                else:
                    before = (start < row0).to(tl.int32)  # the whole chunk precedes (or follows) these rows
                    larger += (other_code[None, :] > (mine_code - before)[:, None]).to(tl.int32)
        else:
            for start in range(0, m, C):
                j = start + tl.arange(0, C)
                other = tl.where(j < m, tl.load(keys_ptr + j, mask=j < m, other=-1), -1 - j.to(tl.int64))
                larger += (other[None, :] > mine[:, None]).to(tl.int32)
        rank = tl.sum(larger, axis=1)
        keep = (i < m) & (rank >= j_lo) & (rank <= j_hi)
        tl.store(split_ptr + (rank - j_lo), mine, mask=keep)


@triton.jit
def _sample_rank_kernel(n, m, split0, keys0, codes0, j_lo0, j_hi0, split1, keys1, codes1, j_lo1, j_hi1,
                        CHECK0: tl.constexpr, CHECK1: tl.constexpr, LOG_M: tl.constexpr, ALL: tl.constexpr,
                        R: tl.constexpr, C: tl.constexpr):
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _rank_stage(pid, n, m, j_lo0, j_hi0, split0, keys0, codes0, CHECK0, LOG_M, ALL, R, C)
    else:
        _rank_stage(pid, n, m, j_lo1, j_hi1, split1, keys1, codes1, CHECK1, LOG_M, ALL, R, C)


@triton.jit
def _bucket(key, split_ptr, width, LOG: tl.constexpr):
    """#{i in 1..width : split[i] > key} for keys ≥ 0, by a branchless binary search (the splitters
    descend; those past ``width`` count as not larger)."""
    b = tl.zeros_like(key).to(tl.int32)
    for s in tl.static_range(LOG):
        cand = b + (1 << (LOG - 1 - s))
        larger = tl.load(split_ptr + cand, mask=cand <= width, other=-1)
        b = tl.where(larger > key, cand, b)
    return b


@triton.jit
def _window_bounds(split_ptr, width, UPPER_OPEN: tl.constexpr, LOWER_OPEN: tl.constexpr):
    if UPPER_OPEN:
        hi = tl.full((), 9223372036854775807, tl.int64)
    else:
        hi = tl.load(split_ptr)
    if LOWER_OPEN:
        lo = tl.full((), 0, tl.int64)
    else:
        lo = tl.maximum(tl.load(split_ptr + width), 0)
    return lo, hi


@triton.jit
def _in_window(key, valid, split_ptr, width, UPPER_OPEN: tl.constexpr, LOWER_OPEN: tl.constexpr):
    """(above, inside): valid keys above the window, valid keys in it."""
    lo, hi = _window_bounds(split_ptr, width, UPPER_OPEN, LOWER_OPEN)
    return valid & (key > hi), valid & (key >= lo) & (key <= hi)


@triton.jit
def _count_buckets(base, count, split_ptr, cnt_ptr, cntf_ptr, buf_ptr, cap, width,
                   WITH_FLAG: tl.constexpr, LOG: tl.constexpr, PAD: tl.constexpr, SUB: tl.constexpr):
    """Count per bucket the ``count`` keys this program appended at ``buf[base:]`` (and the flagged
    ones, bit 63, per bucket), reading them back: the binary search runs on the few percent of the
    tile in the window, not on every lane. Call after a barrier that follows the appending stores;
    the read-back goes through L2 (``.cg``), where those stores of other threads landed."""
    for j in range(0, count, SUB):
        r = j + tl.arange(0, SUB)
        idx = base + r
        ok = (r < count) & (idx < cap)
        e = tl.load(buf_ptr + idx, mask=ok, other=0, cache_modifier=".cg")
        b = _bucket(e & _KEY_BITS, split_ptr, width, LOG)
        tl.atomic_add(cnt_ptr + b * PAD, 1, mask=ok, sem="relaxed")
        if WITH_FLAG:
            tl.atomic_add(cntf_ptr + b * PAD, 1, mask=ok & (e < 0), sem="relaxed")


@triton.jit
def _window_pass_kernel(key_ptr, n, split_ptr, st_ptr, cnt_ptr, buf_ptr, cap, width,
                        UPPER_OPEN: tl.constexpr, LOWER_OPEN: tl.constexpr, LOG: tl.constexpr,
                        PAD: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """One tile of the window pass over stored keys: count the valid keys and those above the window,
    append the keys in the window to ``buf`` (one atomic for the base, a prefix sum within the tile)
    and count them per bucket. Counts of a tile are packed two to an int32 (BLOCK < 2^16)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(key_ptr + offs, mask=offs < n, other=-1)
    valid = key >= 0
    above, inside = _in_window(key, valid, split_ptr, width, UPPER_OPEN, LOWER_OPEN)
    packed = tl.sum(valid.to(tl.int32) + (above.to(tl.int32) << 16), axis=0)
    tl.atomic_add(st_ptr + _N_VALID, (packed & 65535).to(tl.int64), sem="relaxed")
    tl.atomic_add(st_ptr + _N_ABOVE, (packed >> 16).to(tl.int64), sem="relaxed")
    count = tl.sum(inside.to(tl.int32), axis=0)
    if count > 0:
        base = tl.atomic_add(st_ptr + _N_WINDOW, count.to(tl.int64), sem="relaxed")
        pos = base + (tl.cumsum(inside.to(tl.int32), axis=0) - 1)
        tl.store(buf_ptr + pos, key, mask=inside & (pos < cap))
        tl.debug_barrier()
        _count_buckets(base, count, split_ptr, cnt_ptr, cnt_ptr, buf_ptr, cap, width, False, LOG, PAD, SUB)


@triton.jit
def _consistency_select_kernel(
    g_ptr, m_ptr, v_ptr, key_ptr, part_c_ptr, n, beta, one_minus_beta, delta, tau,
    split0, st0, cnt0, cntf0, buf0, cap0, width0,
    split1, st1, cnt1, buf1, cap1, width1,
    MAXIMIZE: tl.constexpr, UPPER_OPEN0: tl.constexpr, LOWER_OPEN0: tl.constexpr, LOG0: tl.constexpr,
    UPPER_OPEN1: tl.constexpr, LOWER_OPEN1: tl.constexpr, LOG1: tl.constexpr,
    PAD: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
):
    """The consistency pass (EMAs, C, keys of the slots with C > τ, −1 elsewhere) carrying the window
    pass of both selects: select 0 over every key (the screen), its window entries flagged by C > τ
    so that the count of consistent keys at or above the screen follows; select 1 over the written
    keys. The two selects share their reductions and their prefix sum (counts packed two to an
    int32, BLOCK < 2^16)."""
    pid = tl.program_id(0)
    offs, inb, c, key = _ema_pass(g_ptr, m_ptr, v_ptr, n, pid, beta, one_minus_beta, delta, MAXIMIZE, BLOCK)
    consistent = (c > tau) & inb
    tl.store(key_ptr + offs, tl.where(consistent, key, -1), mask=inb)
    tl.store(part_c_ptr + pid, tl.sum(tl.where(inb, c, 0.0), axis=0))
    above0, inside0 = _in_window(key, inb, split0, width0, UPPER_OPEN0, LOWER_OPEN0)
    above1, inside1 = _in_window(key, consistent, split1, width1, UPPER_OPEN1, LOWER_OPEN1)
    above = tl.sum(above0.to(tl.int32) + (above1.to(tl.int32) << 16), axis=0)
    flagged = tl.sum((above0 & consistent).to(tl.int32) + (consistent.to(tl.int32) << 16), axis=0)
    if pid == 0:  # every slot has a screen key
        tl.store(st0 + _N_VALID, tl.zeros((), tl.int64) + n)
    tl.atomic_add(st0 + _N_ABOVE, (above & 65535).to(tl.int64), sem="relaxed")
    tl.atomic_add(st1 + _N_ABOVE, (above >> 16).to(tl.int64), sem="relaxed")
    tl.atomic_add(st0 + _N_FLAG_ABOVE, (flagged & 65535).to(tl.int64), sem="relaxed")
    tl.atomic_add(st1 + _N_VALID, (flagged >> 16).to(tl.int64), sem="relaxed")
    inside = inside0.to(tl.int32) + (inside1.to(tl.int32) << 16)
    counts = tl.sum(inside, axis=0)
    if counts > 0:
        count0, count1 = counts & 65535, counts >> 16
        base0 = tl.atomic_add(st0 + _N_WINDOW, count0.to(tl.int64), sem="relaxed")
        base1 = tl.atomic_add(st1 + _N_WINDOW, count1.to(tl.int64), sem="relaxed")
        ends = tl.cumsum(inside, axis=0)
        pos0 = base0 + ((ends & 65535) - 1)
        pos1 = base1 + ((ends >> 16) - 1)
        tl.store(buf0 + pos0, key | (consistent.to(tl.int64) << 63), mask=inside0 & (pos0 < cap0))
        tl.store(buf1 + pos1, key, mask=inside1 & (pos1 < cap1))
        tl.debug_barrier()
        _count_buckets(base0, count0, split0, cnt0, cntf0, buf0, cap0, width0, True, LOG0, PAD, SUB)
        _count_buckets(base1, count1, split1, cnt1, cnt1, buf1, cap1, width1, False, LOG1, PAD, SUB)


@triton.jit
def _hit(st_ptr, k, cap):
    """Whether the answer is a valid key in the window and the window buffer held every key in it."""
    n_above = tl.load(st_ptr + _N_ABOVE)
    n_window = tl.load(st_ptr + _N_WINDOW)
    return (k <= tl.load(st_ptr + _N_VALID)) & (k > n_above) & (k - n_above <= n_window) & (n_window <= cap)


@triton.jit
def _extract_stage(pid, st_ptr, cnt_ptr, cntf_ptr, split_ptr, buf_ptr, small_ptr, k, cap, small_cap, width,
                   WITH_FLAG: tl.constexpr, PAD: tl.constexpr, BINS: tl.constexpr, XBLOCK: tl.constexpr):
    """Copy the keys of the answer's bucket from the window buffer to the small buffer; program 0
    records the answer's rank in that bucket (and adds the flagged keys above the bucket)."""
    if _hit(st_ptr, k, cap):
        bins = tl.arange(0, BINS)
        counts = tl.load(cnt_ptr + bins * PAD, mask=bins <= width, other=0)
        rank = k - tl.load(st_ptr + _N_ABOVE)
        target = tl.sum((tl.cumsum(counts, axis=0) < rank).to(tl.int32), axis=0)
        before = tl.sum(tl.where(bins < target, counts, 0), axis=0)
        n_window = tl.load(st_ptr + _N_WINDOW)
        start = pid * XBLOCK
        if start < n_window:
            # Bucket `target` holds the keys below split[target] (target > 0) and at or above
            # split[target + 1] (target < width): two comparisons instead of a search per key.
            upper = tl.load(split_ptr + target, mask=target > 0, other=0)
            lower = tl.load(split_ptr + target + 1, mask=target < width, other=0)
            idx = start + tl.arange(0, XBLOCK)
            ok = idx < n_window
            e = tl.load(buf_ptr + idx, mask=ok, other=0)
            key = e & _KEY_BITS
            sel = ok & tl.where(target > 0, key < upper, ok) & tl.where(target < width, key >= lower, ok)
            count = tl.sum(sel.to(tl.int32), axis=0)
            if count > 0:
                base = tl.atomic_add(st_ptr + _N_SMALL, count.to(tl.int64), sem="relaxed")
                pos = base + (tl.cumsum(sel.to(tl.int32), axis=0) - 1)
                tl.store(small_ptr + pos, e, mask=sel & (pos < small_cap))
        if pid == 0:
            tl.store(st_ptr + _RANK2, rank - before)
            tl.store(st_ptr + _BUCKET, target.to(tl.int64))
            if WITH_FLAG:
                flagged = tl.load(cntf_ptr + bins * PAD, mask=bins < target, other=0)
                tl.atomic_add(st_ptr + _N_FLAG_GE, tl.load(st_ptr + _N_FLAG_ABOVE) + tl.sum(flagged, axis=0),
                              sem="relaxed")


@triton.jit
def _extract_kernel(st0, cnt0, cntf0, split0, buf0, small0, k0, cap0, small_cap0, width0,
                    st1, cnt1, split1, buf1, small1, k1, cap1, small_cap1, width1,
                    WITH_FLAG0: tl.constexpr, BINS0: tl.constexpr, BINS1: tl.constexpr,
                    PAD: tl.constexpr, XBLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _extract_stage(pid, st0, cnt0, cntf0, split0, buf0, small0, k0, cap0, small_cap0, width0,
                       WITH_FLAG0, PAD, BINS0, XBLOCK)
    else:
        _extract_stage(pid, st1, cnt1, cnt1, split1, buf1, small1, k1, cap1, small_cap1, width1,
                       False, PAD, BINS1, XBLOCK)


@triton.jit
def _load_keys(src, offs, n, SOURCE: tl.constexpr):
    """Keys at ``offs``: read from ``src`` (SOURCE 0) or the selection keys of the gradient ``src``
    (SOURCE 1); −1 past n."""
    inb = offs < n
    if SOURCE == 0:
        key = tl.load(src + offs, mask=inb, other=-1)
    else:
        g = tl.load(src + offs, mask=inb, other=0).to(tl.float32)
        key = tl.where(inb, _selection_key(g, offs), -1)
    return key


@triton.jit
def _exact_select(src, n, k, SOURCE: tl.constexpr, FB: tl.constexpr):
    """The k-th largest valid key (1 ≤ k ≤ #keys ≥ 0) by one program alone: eight 8-bit radix passes
    over all keys. The fallback when the sample's window missed: exact, slow, not expected to run."""
    prefix = tl.full((), 0, tl.int64)
    rank = tl.full((), 0, tl.int64) + k
    digits = tl.arange(0, 256)
    for d in tl.static_range(8):
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n, FB):
            key = _load_keys(src, start + tl.arange(0, FB), n, SOURCE)
            match = key >= 0
            if d > 0:
                match = match & ((key >> (64 - 8 * d)) == (prefix >> (64 - 8 * d)))
            hist += tl.histogram(((key >> (56 - 8 * d)) & 255).to(tl.int32), 256, mask=match)
        h = hist.to(tl.int64)
        at_least = tl.cumsum(h, axis=0, reverse=True)  # keys with this digit or a larger one
        digit = tl.sum((at_least >= rank).to(tl.int64), axis=0) - 1
        rank = rank - tl.sum(tl.where(digits > digit, h, 0), axis=0)
        prefix = prefix | (digit << (56 - 8 * d))
    return prefix


@triton.jit
def _count_at_least(key_ptr, n, threshold, FB: tl.constexpr):
    total = tl.full((), 0, tl.int64)
    for start in range(0, n, FB):
        offs = start + tl.arange(0, FB)
        key = tl.load(key_ptr + offs, mask=offs < n, other=-1)
        total += tl.sum((key >= threshold).to(tl.int64), axis=0)
    return total


@triton.jit
def _final_stage(pid, st_ptr, small_ptr, k, cap, small_cap, thr_ptr, fb_src, n, flag_key_ptr,
                 WITH_FLAG: tl.constexpr, THRESHOLD: tl.constexpr, FB_SOURCE: tl.constexpr,
                 R: tl.constexpr, C: tl.constexpr, FB: tl.constexpr):
    """Rank the small buffer by counting: the key of rank ``RANK2`` is the answer (raised into the
    threshold when THRESHOLD; with WITH_FLAG, the flagged keys at or above it are added). Without a
    hit, program 0 writes −1 (fewer valid keys than k) or runs the exact fallback."""
    n_small = tl.load(st_ptr + _N_SMALL)
    if _hit(st_ptr, k, cap) & (n_small <= small_cap):
        if pid * R < n_small:
            rank = tl.load(st_ptr + _RANK2)
            i = pid * R + tl.arange(0, R)
            ok = i < n_small
            mine = tl.load(small_ptr + i, mask=ok, other=0)
            key = mine & _KEY_BITS
            larger = tl.zeros([R, C], dtype=tl.int32)
            for start in range(0, n_small, C):
                j = start + tl.arange(0, C)
                other = tl.load(small_ptr + j, mask=j < n_small, other=0) & _KEY_BITS
                larger += (other[None, :] > key[:, None]).to(tl.int32)
            above = tl.sum(larger, axis=1)
            win = ok & (above == rank - 1)
            zero = tl.zeros_like(i)
            tl.store(st_ptr + _RESULT + zero, key, mask=win)
            if THRESHOLD:
                tl.atomic_max(thr_ptr + zero, key, mask=win, sem="relaxed")
            if WITH_FLAG:
                tl.atomic_add(st_ptr + _N_FLAG_GE, tl.sum((ok & (above < rank) & (mine < 0)).to(tl.int64), axis=0),
                              sem="relaxed")
    elif pid == 0:
        if k > tl.load(st_ptr + _N_VALID):
            tl.store(st_ptr + _RESULT, tl.full((), -1, tl.int64))
        else:
            key = _exact_select(fb_src, n, k, FB_SOURCE, FB)
            tl.store(st_ptr + _RESULT, key)
            if THRESHOLD:
                tl.atomic_max(thr_ptr, key, sem="relaxed")
            if WITH_FLAG:
                tl.store(st_ptr + _N_FLAG_GE, _count_at_least(flag_key_ptr, n, key, FB))


@triton.jit
def _final_kernel(st0, small0, k0, cap0, small_cap0, fb_src0, flag_key_ptr,
                  st1, small1, k1, cap1, small_cap1, fb_src1, thr_ptr, n,
                  WITH_FLAG0: tl.constexpr, FB_SOURCE0: tl.constexpr, FB_SOURCE1: tl.constexpr,
                  THRESHOLD: tl.constexpr, R: tl.constexpr, C: tl.constexpr, FB: tl.constexpr):
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _final_stage(pid, st0, small0, k0, cap0, small_cap0, thr_ptr, fb_src0, n, flag_key_ptr,
                     WITH_FLAG0, THRESHOLD, FB_SOURCE0, R, C, FB)
    else:
        _final_stage(pid, st1, small1, k1, cap1, small_cap1, thr_ptr, fb_src1, n, flag_key_ptr,
                     False, THRESHOLD, FB_SOURCE1, R, C, FB)


@dataclasses.dataclass
class _SelectBuffers:
    """Device buffers of one sample select: the gathered sample (keys, int32 codes), splitters, window
    buffer, small buffer, and views into the work tensor (state fields, bucket counters, flagged-key
    bucket counters) that the prepare kernel zeroes."""

    plan: SamplePlan
    sample_keys: torch.Tensor
    sample_codes: torch.Tensor
    split: torch.Tensor
    buf: torch.Tensor
    small: torch.Tensor
    state: torch.Tensor
    counts: torch.Tensor
    flagged: torch.Tensor


def _select_buffers(plans: list[SamplePlan], device: torch.device, flag_first: bool):
    """Two uninitialised int64 allocations for every select of a launch: the work tensor (state fields
    and counters, zeroed by the prepare kernel) and the space for samples, splitters and buffers.
    Returns (work, buffers)."""
    sizes = [STATE_STRIDE * len(plans)]
    spaces = []
    for i, plan in enumerate(plans):
        sizes += [plan.bins * PAD, plan.bins * PAD if (i == 0 and flag_first) else 0]
        parts = (plan.m, (plan.m + 1) // 2, plan.width + 1, plan.cap, plan.small)
        spaces += [-(-size // 16) * 16 for size in parts]  # 128-byte aligned
    work = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    zeroed = work.split(sizes)
    space = torch.empty(sum(spaces), dtype=torch.int64, device=device).split(spaces)
    out = []
    for i, plan in enumerate(plans):
        seg = space[5 * i:5 * i + 5]
        out.append(_SelectBuffers(
            plan=plan, sample_keys=seg[0][:plan.m], sample_codes=seg[1].view(torch.int32)[:plan.m],
            split=seg[2][:plan.width + 1], buf=seg[3][:plan.cap], small=seg[4][:plan.small],
            state=zeroed[0][i * STATE_STRIDE:(i + 1) * STATE_STRIDE],
            counts=zeroed[1 + 2 * i],
            flagged=zeroed[2 + 2 * i] if zeroed[2 + 2 * i].numel() else zeroed[1 + 2 * i],
        ))
    return work, out


def _pair(bufs: list[_SelectBuffers]) -> tuple[_SelectBuffers, _SelectBuffers]:
    """The two selects of a launch (a single select fills both slots; its grid has one row)."""
    return bufs[0], bufs[-1]


def kth_largest_key_triton(keys: torch.Tensor, k: int, plan: SamplePlan | None = None) -> torch.Tensor:
    """The k-th largest selection key (``1 <= k <= numel``, checked by the caller; −1 when fewer
    than k keys are ≥ 0) as a 0-d tensor: sample, one window pass over the keys, bucket extraction,
    final rank; no sort and no host sync. ``plan`` overrides :func:`sample_plan` (tests)."""
    return sample_select_triton(keys, k, plan).state[RESULT]


def sample_select_triton(keys: torch.Tensor, k: int, plan: SamplePlan | None = None) -> _SelectBuffers:
    """:func:`kth_largest_key_triton` with its device state (splitters, counts, buffers): the answer is
    ``state[RESULT]``; the other fields are what ``consistency.sample_select_reference`` computes."""
    keys = keys.contiguous()
    n = keys.numel()
    plan = plan or sample_plan(n, k)
    work, (b,) = _select_buffers([plan], keys.device, flag_first=False)
    a, z = _pair([b])
    _prepare_kernel[(triton.cdiv(max(plan.m, work.numel()), PREPARE_BLOCK),)](
        keys, keys, keys, n, plan.m, 0.0, 0.0, 0.0, 0.0, work, work.numel(),
        b.sample_keys, b.sample_codes, b.sample_keys, b.sample_codes,
        0, 0, False, False, plan.log_m, plan.m == n, PREPARE_BLOCK,
    )
    _sample_rank_kernel[(triton.cdiv(plan.m, RANK_ROWS), 1)](
        n, plan.m, a.split, a.sample_keys, a.sample_codes, plan.j_lo, plan.j_hi,
        z.split, z.sample_keys, z.sample_codes, plan.j_lo, plan.j_hi,
        True, True, plan.log_m, plan.m == n, RANK_ROWS, RANK_COLS,
    )
    _window_pass_kernel[(triton.cdiv(n, WINDOW_BLOCK),)](
        keys, n, b.split, b.state, b.counts, b.buf, plan.cap, plan.width,
        plan.upper_open, plan.lower_open, plan.log_bins, PAD, WINDOW_BLOCK, SUB, num_warps=8,
    )
    _extract_kernel[(triton.cdiv(plan.cap, EXTRACT_BLOCK), 1)](
        a.state, a.counts, a.flagged, a.split, a.buf, a.small, k, plan.cap, plan.small, plan.width,
        z.state, z.counts, z.split, z.buf, z.small, k, plan.cap, plan.small, plan.width,
        False, plan.bins, plan.bins, PAD, EXTRACT_BLOCK,
    )
    _final_kernel[(triton.cdiv(plan.small, RANK_ROWS), 1)](
        a.state, a.small, k, plan.cap, plan.small, keys, keys,
        z.state, z.small, k, plan.cap, plan.small, keys, a.state, n,
        False, 0, 0, False, RANK_ROWS, RANK_COLS, FALLBACK_BLOCK,
    )
    return b


@dataclasses.dataclass
class FusedSelection:
    """What :func:`consistency_select_triton` returns (0-d device tensors besides ``keys``).

    ``keys``: the selection keys of the slots with C > τ, −1 elsewhere; ``threshold``: max(screen,
    select), so that ``keys >= threshold`` are the selected slots; ``screen``: the k_screen-th largest
    key over all slots; ``select``: the k_select-th largest of ``keys`` (−1 when fewer are ≥ 0);
    ``sum_c``: ΣC; ``n_eligible``: the eligible slots (C > τ and key ≥ screen)."""

    keys: torch.Tensor
    threshold: torch.Tensor
    sum_c: torch.Tensor
    n_eligible: torch.Tensor
    screen: torch.Tensor
    select: torch.Tensor


def consistency_select_triton(
    grad: torch.Tensor, ema_m: torch.Tensor, ema_v: torch.Tensor, k_screen: int, k_select: int, *,
    beta: float, delta: float, tau: float, maximize: bool, plans: tuple[SamplePlan, SamplePlan] | None = None,
) -> FusedSelection:
    """Steps 1–4 of :mod:`resu.optim.consistency` for one weight in five launches: both thresholds'
    samples gathered and ranked, the consistency pass carrying both window passes, both extractions,
    both final ranks.

    The select runs over the keys of the consistent slots (C > τ) rather than the eligible ones
    (C > τ and key ≥ screen), so that it needs no screen yet and shares the pass: the k_select-th
    largest eligible key is that of the consistent keys when it is ≥ screen, and otherwise fewer than
    k_select slots are eligible and all of them are selected; either way the selected slots are the
    consistent ones with key ≥ max(screen, select). ``plans`` overrides :func:`sample_plan` (tests)."""
    n = grad.numel()
    keys = torch.empty(n, dtype=torch.int64, device=grad.device)
    plans = plans or (sample_plan(n, k_screen), sample_plan(n, k_select))
    work, (screen, select) = _select_buffers(list(plans), grad.device, flag_first=True)
    ps, pc = screen.plan, select.plan
    check_launch_consistency_pass(grad, ema_m, ema_v, keys, screen.state[RESULT])
    if ps.m != pc.m:
        raise ValueError("consistency_select_triton: both plans must sample the same number of keys")
    n_blocks = triton.cdiv(n, FUSED_BLOCK)
    part_c = torch.empty(n_blocks, dtype=torch.float32, device=grad.device)
    hyper = (beta, 1 - beta, delta, tau)
    _prepare_kernel[(triton.cdiv(max(ps.m, work.numel()), PREPARE_BLOCK),)](
        grad, ema_m, ema_v, n, ps.m, *hyper, work, work.numel(),
        screen.sample_keys, screen.sample_codes, select.sample_keys, select.sample_codes,
        1, 2, True, maximize, ps.log_m, ps.m == n, PREPARE_BLOCK,
    )
    _sample_rank_kernel[(triton.cdiv(ps.m, RANK_ROWS), 2)](
        n, ps.m, screen.split, screen.sample_keys, screen.sample_codes, ps.j_lo, ps.j_hi,
        select.split, select.sample_keys, select.sample_codes, pc.j_lo, pc.j_hi,
        False, False, ps.log_m, ps.m == n, RANK_ROWS, RANK_COLS,
    )
    _consistency_select_kernel[(n_blocks,)](
        grad, ema_m, ema_v, keys, part_c, n, *hyper,
        screen.split, screen.state, screen.counts, screen.flagged, screen.buf, ps.cap, ps.width,
        select.split, select.state, select.counts, select.buf, pc.cap, pc.width,
        maximize, ps.upper_open, ps.lower_open, ps.log_bins, pc.upper_open, pc.lower_open, pc.log_bins,
        PAD, FUSED_BLOCK, SUB, num_warps=8,
    )
    _extract_kernel[(triton.cdiv(max(ps.cap, pc.cap), EXTRACT_BLOCK), 2)](
        screen.state, screen.counts, screen.flagged, screen.split, screen.buf, screen.small,
        k_screen, ps.cap, ps.small, ps.width,
        select.state, select.counts, select.split, select.buf, select.small, k_select, pc.cap, pc.small, pc.width,
        True, ps.bins, pc.bins, PAD, EXTRACT_BLOCK,
    )
    threshold = screen.state[THRESHOLD]  # starts at 0 (≤ every screen), raised to max(screen, select)
    _final_kernel[(triton.cdiv(max(ps.small, pc.small), RANK_ROWS), 2)](
        screen.state, screen.small, k_screen, ps.cap, ps.small, grad, keys,
        select.state, select.small, k_select, pc.cap, pc.small, keys, threshold, n,
        True, 1, 0, True, RANK_ROWS, RANK_COLS, FALLBACK_BLOCK,
    )
    return FusedSelection(keys=keys, threshold=threshold, sum_c=part_c.sum(), n_eligible=screen.state[N_FLAG_GE],
                          screen=screen.state[RESULT], select=select.state[RESULT])
