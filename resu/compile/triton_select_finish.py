"""Stages 3 and 4 of the sample select (:mod:`resu.compile.triton_sample_select`): find the bucket that
holds the answer and copy its keys to a small buffer (``_extract_kernel``), then rank the small buffer
(``_final_kernel``); when the window missed or a buffer overflowed, one program finds the answer by an
exact radix select over all keys instead. Both kernels serve one select or two at once (grid rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

from resu.compile.triton_select_state import (
    _BUCKET, _KEY_BITS, _N_ABOVE, _N_FLAG_ABOVE, _N_FLAG_GE, _N_SMALL, _N_VALID, _N_WINDOW, _RANK2, _RESULT,
)
from resu.compile.triton_selective import _selection_key


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


