"""The device state of RESU-Selective's sample select (:mod:`resu.compile.triton_sample_select`): its
tile sizes, the fields of each select's int64 state, and the buffers one launch allocates.

Kept apart from the kernels so that every stage's module (:mod:`resu.compile.triton_sample_select`,
:mod:`resu.compile.triton_select_finish`, :mod:`resu.compile.triton_consistency_select`) reads the same
layout; Triton resolves these constants from each kernel module's globals.
"""

from __future__ import annotations

import dataclasses

import torch
import triton.language as tl

from resu.optim.consistency import SamplePlan

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

