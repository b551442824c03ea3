"""Triton kernels of RESU-Selective's selection: the selection keys of a gradient, and the fused
EMA/consistency/eligibility pass. The AdamW steps on the selected slots are in
:mod:`resu.compile.triton_adamw`.

Selection keys (see :mod:`resu.optim.consistency`) rank θ slots by |g| with ties broken by the lower
index: ``key = bits(|g| as fp32) << 32 | (2³² − 1 − index)``, an int64 that is unique per slot and
ordered like (|g| descending, index ascending). A selection is then "key ≥ threshold", with the
threshold a 0-d device tensor read by the kernel, so no host sync is needed between passes.

:func:`kth_largest_key_triton` finds the k-th largest key by radix select (histogram passes, no sort).

Each kernel has a plain-PyTorch reference in :mod:`resu.optim.consistency`; tests run them on CPU under
``TRITON_INTERPRET=1``. This module imports Triton: import it lazily, only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.launch_checks import check_launch_consistency_pass

BLOCK = 1024


@triton.jit
def _selection_key(g, offs):
    """int64 key ordering slots by |g| descending, then index ascending (unique per slot)."""
    bits = tl.abs(g).to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (4294967295 - offs.to(tl.int64))


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
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=inb, other=0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb, other=0).to(tl.float32)
    m = m * beta + g * one_minus_beta
    v = v * beta + tl.abs(g) * one_minus_beta
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=inb)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=inb)
    # C from the stored (possibly lower-precision) EMAs, as the reference does.
    m = m.to(m_ptr.dtype.element_ty).to(tl.float32)
    v = v.to(v_ptr.dtype.element_ty).to(tl.float32)
    c = tl.abs(m) / (v + delta)
    key = _selection_key(g, offs)
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


# ------------------------------------------------------------------ exact k-th largest key (radix select)
# A key splits into its high half + 1 (|g| bits; 0 for the −1 keys), in [0, 2³¹], and its low half, in
# [0, 2³²): 33 bits each, read as three 11-bit digits each, most significant first. Pass j histograms
# digit j of the keys whose earlier digits are those of the k-th largest key; the digit of the k-th
# largest is where the count from the top reaches the remaining rank. Every program of pass j
# re-derives those earlier digits from the histograms already written, so the passes need no host
# work between them and nothing is ever synced.
RADIX_BITS = 11
RADIX_BINS = 1 << RADIX_BITS
RADIX_PASSES = 6
RADIX_BLOCK = 4096


@triton.jit
def _radix_pick(hist_ptr, rank, BINS: tl.constexpr):
    """The digit where the count of keys from the largest digit down first reaches ``rank``, and the
    rank left among the keys with that digit."""
    h = tl.load(hist_ptr + tl.arange(0, BINS)).to(tl.int64)
    at_least = tl.cumsum(h, axis=0, reverse=True)  # keys with this digit or a larger one
    digit = tl.sum((at_least >= rank).to(tl.int64), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, BINS) > digit, h, 0), axis=0)
    return digit, rank - above


@triton.jit
def _radix_prefix(hist_ptr, k, PASS: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr):
    """(high prefix, low prefix, rank left) after the first ``PASS`` digits of the k-th largest key."""
    rank = tl.full((), 0, tl.int64) + k  # k may arrive as a constexpr (Triton specializes k == 1)
    high = tl.full((), 0, tl.int64)
    low = tl.full((), 0, tl.int64)
    for j in tl.static_range(PASS):
        digit, rank = _radix_pick(hist_ptr + j * BINS, rank, BINS)
        if j < 3:
            high = (high << BITS) | digit
        else:
            low = (low << BITS) | digit
    return high, low, rank


@triton.jit
def _radix_pass_kernel(key_ptr, hist_ptr, n, k, PASS: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr,
                       BLOCK: tl.constexpr):
    high_prefix, low_prefix, _ = _radix_prefix(hist_ptr, k, PASS, BINS, BITS)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    key = tl.load(key_ptr + offs, mask=inb, other=-1)
    high = (key >> 32) + 1
    low = key & 4294967295
    if PASS < 3:
        shift: tl.constexpr = BITS * (2 - PASS)
        match = inb & ((high >> (shift + BITS)) == high_prefix)
        digit = (high >> shift) & (BINS - 1)
    else:
        shift: tl.constexpr = BITS * (5 - PASS)
        match = inb & (high == high_prefix) & ((low >> (shift + BITS)) == low_prefix)
        digit = (low >> shift) & (BINS - 1)
    counts = tl.histogram(digit.to(tl.int32), BINS, mask=match)
    tl.atomic_add(hist_ptr + PASS * BINS + tl.arange(0, BINS), counts, sem="relaxed")


@triton.jit
def _radix_key_kernel(hist_ptr, out_ptr, k, PASSES: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr):
    high, low, _ = _radix_prefix(hist_ptr, k, PASSES, BINS, BITS)
    tl.store(out_ptr, ((high - 1) << 32) | low)


def kth_largest_key_triton(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest selection key (``1 <= k <= numel``, checked by the caller) as a 0-d tensor:
    six histogram passes over the keys and one pick, no sort and no host sync."""
    n = keys.numel()
    hist = torch.zeros(RADIX_PASSES, RADIX_BINS, dtype=torch.int32, device=keys.device)
    grid = (triton.cdiv(n, RADIX_BLOCK),)
    for j in range(RADIX_PASSES):
        _radix_pass_kernel[grid](keys, hist, n, k, j, RADIX_BINS, RADIX_BITS, RADIX_BLOCK)
    out = torch.empty((), dtype=torch.int64, device=keys.device)
    _radix_key_kernel[(1,)](hist, out, k, RADIX_PASSES, RADIX_BINS, RADIX_BITS)
    return out
