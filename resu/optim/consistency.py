"""The consistency strategy of RESU-Selective: selection keys, the EMA/consistency pass, thresholds.

For one weight with p θ slots and compact gradient g (after ``maximize`` negation):

1. ``keys = selection_keys(g)``: int64, unique per slot, ordered like (|g| descending, index
   ascending): ``bits(|g| as fp32) << 32 | (2³² − 1 − index)`` (|g| ≥ 0, so its fp32 bit pattern
   orders like its value). Ranking by key is ranking by |g| with ties to the lower index.
2. ``screen = kth_largest(keys, k_screen)``: P_mag = {key ≥ screen}, exactly k_screen slots.
3. :func:`consistency_pass_` (one fused pass): m ← βm + (1−β)g, v ← βv + (1−β)|g| (every slot),
   C = |m| / (v + δ) from the stored m, v; eligible = C > τ and key ≥ screen; keys of ineligible
   slots become −1. Returns ΣC and the number of eligible slots as 0-d device tensors.
4. ``threshold = max(kth_largest(keys, k_select), 0)``: the slots with key ≥ threshold are the
   k_select eligible slots of largest |g|, or all eligible slots when fewer.

All of it stays on the device (thresholds are 0-d tensors): no host sync per step. CUDA tensors take
the Triton kernels of :mod:`resu.compile.triton_selective`; the references here define the semantics.
"""

from __future__ import annotations

import torch

from resu.compile import registry

_INDEX_COMPLEMENT = (1 << 32) - 1


def selection_keys_reference(grad: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`selection_keys`."""
    bits = grad.detach().reshape(-1).float().abs().view(torch.int32).to(torch.int64)
    index = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64)
    return (bits << 32) | (_INDEX_COMPLEMENT - index)


def selection_keys(grad: torch.Tensor) -> torch.Tensor:
    """int64 keys of a compact gradient vector: larger |g| → larger key, ties → lower index larger."""
    if registry.use_triton(grad):
        from resu.compile.triton_selective import selection_keys_triton

        return selection_keys_triton(grad)
    return selection_keys_reference(grad)


def kth_largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of ``keys`` (1 ≤ k ≤ numel) as a 0-d tensor on the same device."""
    if not 1 <= k <= keys.numel():
        raise ValueError(f"kth_largest: `k` must be in [1, {keys.numel()}], got {k}")
    if k == keys.numel():
        return keys.min()
    return torch.topk(keys, k, sorted=False).values.min()


@torch.no_grad()
def consistency_pass_reference_(grad, ema_m, ema_v, keys, screen_threshold, *, beta, delta, tau, maximize):
    """Reference for :func:`consistency_pass_`."""
    g = grad.reshape(-1).float()
    if maximize:
        g = -g
    m = ema_m.float() * beta + g * (1 - beta)
    v = ema_v.float() * beta + g.abs() * (1 - beta)
    ema_m.copy_(m)
    ema_v.copy_(v)
    consistency = ema_m.float().abs() / (ema_v.float() + delta)
    eligible = (consistency > tau) & (keys >= screen_threshold)
    keys.masked_fill_(~eligible, -1)
    return consistency.sum(), eligible.sum()


@torch.no_grad()
def consistency_pass_(
    grad: torch.Tensor,
    ema_m: torch.Tensor,
    ema_v: torch.Tensor,
    keys: torch.Tensor,
    screen_threshold: torch.Tensor,
    *,
    beta: float,
    delta: float,
    tau: float,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update the EMAs of every slot, compute C, and keep in ``keys`` (in place) only the eligible
    slots (C > τ and key ≥ ``screen_threshold``), −1 elsewhere. Returns (ΣC, n_eligible), 0-d tensors."""
    if registry.use_triton(grad, ema_m, ema_v, keys):
        from resu.compile.triton_selective import consistency_pass_triton_

        return consistency_pass_triton_(
            grad, ema_m, ema_v, keys, screen_threshold, beta=beta, delta=delta, tau=tau, maximize=maximize
        )
    return consistency_pass_reference_(
        grad, ema_m, ema_v, keys, screen_threshold, beta=beta, delta=delta, tau=tau, maximize=maximize
    )


@torch.no_grad()
def consistency_selection(grad, ema_m, ema_v, config, maximize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–4 above for one weight: returns ``(keys, threshold, sum_c, n_selected)``; the slots to
    update are ``keys >= threshold`` (exactly ``n_selected`` of them)."""
    n = grad.numel()
    k_screen, k_select = config.screen_count(n), config.select_count(n)
    keys = selection_keys(grad)
    screen = kth_largest(keys, k_screen)
    sum_c, n_eligible = consistency_pass_(
        grad, ema_m, ema_v, keys, screen, beta=config.beta, delta=config.delta, tau=config.tau_stable, maximize=maximize
    )
    threshold = kth_largest(keys, k_select).clamp_min(0)
    return keys, threshold, sum_c, n_eligible.clamp(max=k_select)
