"""Triton kernels for θ steps: AdamW over a compact θ vector (all, masked, key-selected or indexed
slots), the fused EMA/consistency/eligibility pass of RESU-Selective, and the key-selected AdamW
step straight on the pruned slots of a bitmap-masked dense weight.

Selection keys (see :mod:`resu.optim.consistency`) rank θ slots by |g| with ties broken by the lower
index: ``key = bits(|g| as fp32) << 32 | (2³² − 1 − index)``, an int64 that is unique per slot and
ordered like (|g| descending, index ascending). A selection is then "key ≥ threshold", with the
threshold a 0-d device tensor read by the kernel, so no host sync is needed between passes.

Each kernel is one pass; every one has a plain-PyTorch reference (:mod:`resu.compile.theta_adamw`,
:mod:`resu.optim.consistency`, :mod:`resu.optim.theta_slots`), and tests run them on CPU under
``TRITON_INTERPRET=1``. This module imports Triton: import it lazily, only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu.compile.triton_bitmap import BLOCK as BITMAP_BLOCK
from resu.compile.triton_bitmap import NUM_WARPS as BITMAP_NUM_WARPS
from resu.compile.triton_bitmap import cached_block_offsets, tile_ranks

BLOCK = 1024

# How the compact AdamW kernel picks its slots.
SELECT_ALL, SELECT_MASK, SELECT_KEY = 0, 1, 2


@triton.jit
def _selection_key(g, offs):
    """int64 key ordering slots by |g| descending, then index ascending (unique per slot)."""
    bits = tl.abs(g).to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (4294967295 - offs.to(tl.int64))


@triton.jit
def _adamw_math(w, g, m, v, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    # The same operation order as resu.compile.adamw_math.adamw_update_ (torch.optim.AdamW).
    w = w * decay
    m = m + (g - m) * (1 - beta1)
    v = v * beta2 + g * g * (1 - beta2)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    w = w - step_size * (m / denom)
    return w, m, v


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


@triton.jit
def _theta_adamw_kernel(
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
    w = tl.load(theta_ptr + offs, mask=sel, other=0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=sel, other=0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=sel, other=0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=sel, other=0).to(tl.float32)
    w, m, v = _adamw_math(w, g, m, v, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
    tl.store(theta_ptr + offs, w.to(theta_ptr.dtype.element_ty), mask=sel)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=sel)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=sel)


def _adamw_scalars(step: int, lr: float, beta1: float, beta2: float, weight_decay: float) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction) of one AdamW step."""
    return 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def theta_adamw_triton_(
    theta, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, maximize,
    select_mode: int = SELECT_ALL, selector=None, threshold=None,
) -> None:
    """AdamW on a compact θ vector: every slot, slots where the bool ``selector`` is True
    (``SELECT_MASK``), or slots whose int64 key in ``selector`` is ≥ the 0-d ``threshold`` (``SELECT_KEY``)."""
    n = theta.numel()
    if n == 0:
        return
    decay, step_size, bc2 = _adamw_scalars(step, lr, beta1, beta2, weight_decay)
    if select_mode == SELECT_MASK:
        selector = selector.view(torch.uint8)
    selector = grad if selector is None else selector  # an unused pointer when SELECT_ALL
    threshold = selector if threshold is None else threshold
    _theta_adamw_kernel[(triton.cdiv(n, BLOCK),)](
        theta, grad, exp_avg, exp_avg_sq, selector, threshold, n,
        decay, beta1, beta2, eps, step_size, bc2, select_mode, maximize, BLOCK,
    )


@triton.jit
def _indexed_adamw_kernel(
    param_ptr, pidx_ptr, g_ptr, gidx_ptr, m_ptr, v_ptr, k,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < k
    pidx = tl.load(pidx_ptr + offs, mask=inb, other=0)
    gidx = tl.load(gidx_ptr + offs, mask=inb, other=0)
    w = tl.load(param_ptr + pidx, mask=inb, other=0).to(tl.float32)
    g = tl.load(g_ptr + gidx, mask=inb, other=0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=inb, other=0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb, other=0).to(tl.float32)
    w, m, v = _adamw_math(w, g, m, v, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
    tl.store(param_ptr + pidx, w.to(param_ptr.dtype.element_ty), mask=inb)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=inb)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=inb)


def indexed_adamw_triton_(
    param, param_index, grad, grad_index, exp_avg, exp_avg_sq, step, *,
    lr, beta1, beta2, eps, weight_decay, maximize,
) -> None:
    """AdamW on ``param.view(-1)[param_index]`` with gradient ``grad[grad_index]``; states sized k."""
    k = param_index.numel()
    if k == 0:
        return
    decay, step_size, bc2 = _adamw_scalars(step, lr, beta1, beta2, weight_decay)
    _indexed_adamw_kernel[(triton.cdiv(k, BLOCK),)](
        param.view(-1), param_index, grad, grad_index, exp_avg, exp_avg_sq, k,
        decay, beta1, beta2, eps, step_size, bc2, maximize, BLOCK,
    )


@triton.jit
def _bitmap_key_adamw_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, key_ptr, thr_ptr, bits_ptr, offsets_ptr, numel,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, pruned, rank = tile_ranks(bits_ptr, offsets_ptr, numel, True, BLOCK)  # rank: θ index of a pruned slot
    sel = pruned & (tl.load(key_ptr + rank, mask=pruned, other=-1) >= tl.load(thr_ptr))
    w = tl.load(w_ptr + offs, mask=sel, other=0).to(tl.float32)
    g = tl.load(g_ptr + rank, mask=sel, other=0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + rank, mask=sel, other=0).to(tl.float32)
    v = tl.load(v_ptr + rank, mask=sel, other=0).to(tl.float32)
    w, m, v = _adamw_math(w, g, m, v, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=sel)
    tl.store(m_ptr + rank, m.to(m_ptr.dtype.element_ty), mask=sel)
    tl.store(v_ptr + rank, v.to(v_ptr.dtype.element_ty), mask=sel)


def bitmap_key_adamw_triton_(
    weight, grad, exp_avg, exp_avg_sq, storage, keys, threshold, step, *,
    lr, beta1, beta2, eps, weight_decay, maximize,
) -> None:
    """AdamW on the pruned slots of a bitmap-masked dense ``weight`` whose θ key is ≥ ``threshold``.

    ``grad``, states and ``keys`` are compact (one per pruned slot, ascending flat order)."""
    numel = weight.numel()
    if numel == 0 or keys.numel() == 0:
        return
    offsets = cached_block_offsets(storage, numel, True)
    decay, step_size, bc2 = _adamw_scalars(step, lr, beta1, beta2, weight_decay)
    _bitmap_key_adamw_kernel[(offsets.numel(),)](
        weight.view(-1), grad, exp_avg, exp_avg_sq, keys, threshold, storage, offsets, numel,
        decay, beta1, beta2, eps, step_size, bc2, maximize, BITMAP_BLOCK, num_warps=BITMAP_NUM_WARPS,
    )
