"""The consistency pass of RESU-Selective carrying both thresholds' sample selects (``select_impl``
"fused"): the pass computes every slot's key anyway, so the window passes of the screen and select
thresholds (:mod:`resu.compile.triton_sample_select`) ride in it, and both thresholds take five launches
in all (prepare, rank, this pass, extract, final). Tests run it on CPU under ``TRITON_INTERPRET=1``
against the top-k path of :mod:`resu.optim.consistency`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.launch_checks import check_launch_consistency_pass
from resu.compile.triton_sample_select import _count_buckets, _in_window, _prepare_kernel, _sample_rank_kernel
from resu.compile.triton_select_finish import _extract_kernel, _final_kernel
from resu.compile.triton_selective import _ema_pass
from resu.optim.consistency import SamplePlan, sample_plan
from resu.compile.triton_select_state import (
    EXTRACT_BLOCK, FALLBACK_BLOCK, FUSED_BLOCK, _N_ABOVE, _N_FLAG_ABOVE, N_FLAG_GE, _N_VALID, _N_WINDOW, PAD,
    PREPARE_BLOCK, RANK_COLS, RANK_ROWS, RESULT, _select_buffers, SUB, THRESHOLD,
)


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
    n_blocks = cdiv(n, FUSED_BLOCK)
    part_c = torch.empty(n_blocks, dtype=torch.float32, device=grad.device)
    hyper = (beta, 1 - beta, delta, tau)
    _prepare_kernel[(cdiv(max(ps.m, work.numel()), PREPARE_BLOCK),)](
        grad, ema_m, ema_v, n, ps.m, *hyper, work, work.numel(),
        screen.sample_keys, screen.sample_codes, select.sample_keys, select.sample_codes,
        1, 2, True, maximize, ps.log_m, ps.m == n, PREPARE_BLOCK,
    )
    _sample_rank_kernel[(cdiv(ps.m, RANK_ROWS), 2)](
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
    _extract_kernel[(cdiv(max(ps.cap, pc.cap), EXTRACT_BLOCK), 2)](
        screen.state, screen.counts, screen.flagged, screen.split, screen.buf, screen.small,
        k_screen, ps.cap, ps.small, ps.width,
        select.state, select.counts, select.split, select.buf, select.small, k_select, pc.cap, pc.small, pc.width,
        True, ps.bins, pc.bins, PAD, EXTRACT_BLOCK,
    )
    threshold = screen.state[THRESHOLD]  # starts at 0 (≤ every screen), raised to max(screen, select)
    _final_kernel[(cdiv(max(ps.small, pc.small), RANK_ROWS), 2)](
        screen.state, screen.small, k_screen, ps.cap, ps.small, grad, keys,
        select.state, select.small, k_select, pc.cap, pc.small, keys, threshold, n,
        True, 1, 0, True, RANK_ROWS, RANK_COLS, FALLBACK_BLOCK,
    )
    return FusedSelection(keys=keys, threshold=threshold, sum_c=part_c.sum(), n_eligible=screen.state[N_FLAG_GE],
                          screen=screen.state[RESULT], select=select.state[RESULT])

