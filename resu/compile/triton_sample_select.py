"""RESU-Selective's exact k-th largest selection key on CUDA: the sample select (stages 1 and 2 here,
3 and 4 in :mod:`resu.compile.triton_select_finish`, the state layout in
:mod:`resu.compile.triton_select_state`).

**Exact k-th largest key by sample select** (:func:`kth_largest_key_triton`, and fused into the
consistency pass by :func:`~resu.compile.triton_consistency_select.consistency_select_triton`). Why not a radix select: a digit histogram of
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
buffer; five launches, no host sync. Fused into the consistency pass (``select_impl`` "fused",
:mod:`resu.compile.triton_consistency_select`), both
thresholds' windows ride in the pass that reads g, m, v and writes m, v and the keys anyway (28 B per
slot; the windows add ~120 instructions per slot to its ~55, under the ~230 that 28 B take at HBM
speed), the selection-keys kernel is no longer needed, and both thresholds take five launches in all
(prepare, rank, the pass, extract, final) where top-k took two sorts.

Each kernel has a plain-PyTorch reference in :mod:`resu.optim.consistency`; tests run them on CPU under
``TRITON_INTERPRET=1``. This module imports Triton: import it lazily, only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.triton_select_finish import _extract_kernel, _final_kernel
from resu.compile.triton_selective import _ema_step, _selection_key
from resu.optim.consistency import SamplePlan, sample_plan
from resu.compile.triton_select_state import (
    EXTRACT_BLOCK, FALLBACK_BLOCK, _KEY_BITS, _N_ABOVE, _N_VALID, _N_WINDOW, PAD, _pair, PREPARE_BLOCK,
    RANK_COLS, RANK_ROWS, RESULT, _SelectBuffers, _select_buffers, SUB, WINDOW_BLOCK,
)


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
    _prepare_kernel[(cdiv(max(plan.m, work.numel()), PREPARE_BLOCK),)](
        keys, keys, keys, n, plan.m, 0.0, 0.0, 0.0, 0.0, work, work.numel(),
        b.sample_keys, b.sample_codes, b.sample_keys, b.sample_codes,
        0, 0, False, False, plan.log_m, plan.m == n, PREPARE_BLOCK,
    )
    _sample_rank_kernel[(cdiv(plan.m, RANK_ROWS), 1)](
        n, plan.m, a.split, a.sample_keys, a.sample_codes, plan.j_lo, plan.j_hi,
        z.split, z.sample_keys, z.sample_codes, plan.j_lo, plan.j_hi,
        True, True, plan.log_m, plan.m == n, RANK_ROWS, RANK_COLS,
    )
    _window_pass_kernel[(cdiv(n, WINDOW_BLOCK),)](
        keys, n, b.split, b.state, b.counts, b.buf, plan.cap, plan.width,
        plan.upper_open, plan.lower_open, plan.log_bins, PAD, WINDOW_BLOCK, SUB, num_warps=8,
    )
    _extract_kernel[(cdiv(plan.cap, EXTRACT_BLOCK), 1)](
        a.state, a.counts, a.flagged, a.split, a.buf, a.small, k, plan.cap, plan.small, plan.width,
        z.state, z.counts, z.split, z.buf, z.small, k, plan.cap, plan.small, plan.width,
        False, plan.bins, plan.bins, PAD, EXTRACT_BLOCK,
    )
    _final_kernel[(cdiv(plan.small, RANK_ROWS), 1)](
        a.state, a.small, k, plan.cap, plan.small, keys, keys,
        z.state, z.small, k, plan.cap, plan.small, keys, a.state, n,
        False, 0, 0, False, RANK_ROWS, RANK_COLS, FALLBACK_BLOCK,
    )
    return b

