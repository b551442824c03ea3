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

``kth_largest`` costs a ``torch.topk`` call (a sort on large inputs); :func:`kth_largest_key` finds the
same key by a radix select (digit histograms, no sort; on CUDA six Triton passes, no host sync),
using how the keys are built.

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


def _digit_at_rank(digits: torch.Tensor, weights: torch.Tensor, n_bins: int, k: torch.Tensor):
    """(d, k'): the digit d of the k-th largest entry (counting ``weights``) and its rank k' among those
    with digit d. Device tensors only: no host sync."""
    hist = torch.zeros(n_bins + 1, dtype=torch.int64, device=digits.device)
    hist.scatter_add_(0, digits, weights)
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[d] = #entries with digit >= d; at_least[n_bins] = 0
    d = (at_least[:n_bins] >= k).sum() - 1
    return d, k - at_least.index_select(0, (d + 1).view(1)).squeeze(0)


def kth_largest_key(keys: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`kth_largest` of selection keys (``selection_keys``, some possibly overwritten with −1), by a
    radix select: no sort, no top-k buffers, no host sync. CUDA tensors take the Triton kernels of
    :func:`resu.compile.triton_selective.kth_largest_key_triton`; the reference below digs 16 bits of
    the high half at a time, then scans the ties.

    A key is ``bits(|g|) << 32 | (2³² − 1 − position)``: the k-th largest has the k-th largest high half
    v (found 16 bits at a time from histograms), and among the keys whose high half is v, it is the one
    at the r-th smallest position. Keys of −1 all rank below every other key and equal each other."""
    n = keys.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest_key: `k` must be in [1, {n}], got {k}")
    if registry.use_triton(keys):
        from resu.compile.triton_selective import kth_largest_key_triton

        return kth_largest_key_triton(keys, k)
    return kth_largest_key_reference(keys, k)


def kth_largest_key_reference(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Reference for :func:`kth_largest_key` (16-bit digits of the high half, then a scan of the ties)."""
    high = (keys >> 32) + 1  # in [0, 2^31]: the −1 keys become 0
    ones = torch.ones_like(high)
    rank = torch.full((), k, dtype=torch.int64, device=keys.device)
    top, rank = _digit_at_rank(high >> 16, ones, 1 << 15 | 1, rank)
    low, rank = _digit_at_rank(high & 0xFFFF, ((high >> 16) == top).to(torch.int64), 1 << 16, rank)
    ties = high == ((top << 16) | low)
    position = (ties.cumsum(0) < rank).sum()  # where the rank-th tie sits
    return keys.index_select(0, position.view(1)).squeeze(0)


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


# The exact k-th-largest select the thresholds use, per device type (default: kth_largest, two top-k
# calls). kth_largest_key gives the same thresholds bitwise without sorting; benchmarks/gpu_optim.py
# measures both on the GPU, and the faster becomes the CUDA default.
select_impl: dict = {}


@torch.no_grad()
def consistency_selection(grad, ema_m, ema_v, config, maximize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–4 above for one weight: returns ``(keys, threshold, sum_c, n_selected)``; the slots to
    update are ``keys >= threshold`` (exactly ``n_selected`` of them)."""
    n = grad.numel()
    k_screen, k_select = config.screen_count(n), config.select_count(n)
    keys = selection_keys(grad)
    kth = select_impl.get(keys.device.type, kth_largest)
    screen = kth(keys, k_screen)
    sum_c, n_eligible = consistency_pass_(
        grad, ema_m, ema_v, keys, screen, beta=config.beta, delta=config.delta, tau=config.tau_stable, maximize=maximize
    )
    threshold = kth(keys, k_select).clamp_min(0)
    return keys, threshold, sum_c, n_eligible.clamp(max=k_select)
