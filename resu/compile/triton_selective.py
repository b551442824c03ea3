"""Triton kernels of RESU-Selective's selection: the selection keys of a gradient and the fused
EMA/consistency/eligibility pass. The AdamW steps on the selected slots are in
:mod:`resu.compile.triton_adamw`; the exact k-th largest key behind the two thresholds is in
:mod:`resu.compile.triton_sample_select`, and the consistency pass that carries both selects in
:mod:`resu.compile.triton_consistency_select`.

Selection keys (see :mod:`resu.optim.consistency`) rank θ slots by |g| with ties broken by the lower
index: ``key = bits(|g| as fp32) << 32 | (2³² − 1 − index)``, an int64 that is unique per slot and
ordered like (|g| descending, index ascending). A selection is then "key ≥ threshold", with the
threshold a 0-d device tensor read by the kernel, so no host sync is needed between passes.

Each kernel has a plain-PyTorch reference in :mod:`resu.optim.consistency`; tests run them on CPU under
``TRITON_INTERPRET=1``. This module imports Triton: import it lazily, only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.grid import cdiv
from resu.compile.launch_checks import check_launch_consistency_pass

BLOCK = 1024


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
        _keys_kernel[(cdiv(n, BLOCK),)](grad, keys, n, BLOCK)
    return keys


@triton.jit
def _consistency_kernel(
    g_ptr, m_ptr, v_ptr, key_ptr, screen_ptr, part_c_ptr, part_n_ptr, n,
    beta, one_minus_beta, delta, tau, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, inb, c, _ = _ema_pass(g_ptr, m_ptr, v_ptr, n, pid, beta, one_minus_beta, delta, MAXIMIZE, BLOCK)
    # The keys are read, not recomputed from the gradient: a row shard's keys carry the slot's index in
    # the whole weight (resu.optim.consistency._shard_selection), which the gradient alone does not know.
    key = tl.load(key_ptr + offs, mask=inb, other=-1)
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
    n_blocks = max(1, cdiv(n, BLOCK))
    alloc = torch.empty if n else torch.zeros  # every program writes its own partial
    part_c = alloc(n_blocks, dtype=torch.float32, device=grad.device)
    part_n = alloc(n_blocks, dtype=torch.int32, device=grad.device)
    if n:
        _consistency_kernel[(n_blocks,)](
            grad, ema_m, ema_v, keys, screen_threshold, part_c, part_n, n,
            beta, 1 - beta, delta, tau, maximize, BLOCK,
        )
    return part_c.sum(), part_n.sum()

