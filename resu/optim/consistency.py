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

``kth_largest`` costs a ``torch.topk`` call (a sort on large inputs). :func:`kth_largest_key` finds the
same key by a sample select (a sample ranked, one pass over the keys counting and gathering those in
a window around the sample's estimate, then the answer's bucket ranked; exact whatever the sample,
with an exact fallback; on CUDA five Triton launches, no host sync). ``select_impl`` picks per
device type: "topk" (the CPU default), "key" (kth_largest_key for both thresholds), or "fused" (the
CUDA default: both selects' passes ride in the consistency pass itself, which then keeps in ``keys``
the slots with C > τ and returns the threshold max(screen, select): the same selected slots; see
:func:`resu.compile.triton_consistency_select.consistency_select_triton`).

All of it stays on the device (thresholds are 0-d tensors): no host sync per step. CUDA tensors take
the Triton kernels of :mod:`resu.compile.triton_selective`, :mod:`resu.compile.triton_sample_select` and
:mod:`resu.compile.triton_consistency_select`; the references here define the semantics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

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


# ------------------------------------------------------------------ exact k-th largest key: sample select
# The plan of one select is host arithmetic on (n, k): which samples become splitters, how large the
# buffers are. Everything data-dependent stays on the device.
SAMPLE_MAX = 8192
MISS_LOG = 20.0  # each side of the window misses with probability below e^-MISS_LOG


def sample_size(n: int) -> int:
    """Samples per select: the power of two near √(2n) (between 256 and SAMPLE_MAX), which balances
    ranking the sample (m² comparisons) against ranking the answer's bucket (about (2n/m)²)."""
    m = 256
    while m * m < 2 * n and m < SAMPLE_MAX:
        m *= 2
    return m


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Host-side plan of one sample select of the k-th largest of n keys (see
    :mod:`resu.compile.triton_sample_select`).

    ``m`` keys are sampled (one per stratum of n/m slots); the sampled keys ranked ``j_lo`` … ``j_hi``
    (0 = largest) are the splitters; ``upper_open`` / ``lower_open``: the window has no upper bound /
    reaches down to key 0; ``cap``: window buffer size; ``small``: size of the buffer of the answer's
    bucket. A buffer that would overflow sends the select to its exact fallback."""

    n: int
    k: int
    m: int
    j_lo: int
    j_hi: int
    upper_open: bool
    lower_open: bool
    cap: int
    small: int

    @property
    def log_m(self) -> int:
        """log2(m) when strata are sampled (m < n, a power of two); unused when m = n."""
        return max(self.m.bit_length() - 1, 0)

    @property
    def width(self) -> int:
        """Splitters past the first: buckets are 0 … width."""
        return self.j_hi - self.j_lo

    @property
    def bins(self) -> int:
        return max(2, 1 << self.width.bit_length())

    @property
    def log_bins(self) -> int:
        return self.bins.bit_length() - 1


@functools.lru_cache(maxsize=256)
def sample_plan(n: int, k: int, sample: Optional[int] = None) -> SamplePlan:
    """Plan of the k-th largest of n keys with ``sample`` samples (default :func:`sample_size`).

    With X the number of sampled keys ≥ the answer, the window [sample j_hi, sample j_lo] holds the
    answer when j_lo < X ≤ j_hi. X sums one Bernoulli per stratum, with mean within k/(s(s+1)) of
    λ = k·m/n (strata of s or s + 1 slots) and variance at most m·p·(1 − p), p = k/n; Bernstein's
    inequality puts it within t = L/3 + √(L²/9 + 2L·var) of its mean but with probability e^-L per side
    (L = MISS_LOG). When m = n every key is sampled and X = k exactly."""
    if not 1 <= k <= n:
        raise ValueError(f"sample_plan: `k` must be in [1, {n}], got {k}")
    sample = sample or sample_size(n)
    if sample < 2 or sample & (sample - 1):
        raise ValueError(f"sample_plan: `sample` must be a power of two >= 2, got {sample}")
    m = min(n, sample)
    if m == n:
        lam, t = float(k), 0.0
    else:
        p, s = k / n, n // m
        lam = k * m / n
        t = MISS_LOG / 3 + math.sqrt(MISS_LOG**2 / 9 + 2 * MISS_LOG * m * p * (1 - p)) + k / (s * (s + 1))
    j_lo, j_hi = math.floor(lam - t) - 1, math.ceil(lam + t)
    upper_open, lower_open = j_lo < 0, j_hi >= m - 1
    j_lo, j_hi = max(j_lo, 0), min(j_hi, m - 1)
    per = -(-n // m)  # slots per stratum, at most
    # The window spans width + 1 sample gaps of about `per` keys each; their sum varies by about
    # √(width)·per, and 8 of those are allowed for.
    expected = (j_hi - j_lo + 2) * per
    cap = min(n, expected + 8 * math.isqrt(expected * per) + 64)
    # The answer's bucket is a size-biased gap between samples: above 24 strata with probability ~1e-9.
    small = min(cap, 24 * per + 64)
    return SamplePlan(n, k, m, j_lo, j_hi, upper_open, lower_open, cap, small)


def sample_positions(n: int, m: int, device=None) -> torch.Tensor:
    """The sampled slots: one per stratum [j·n/m, (j+1)·n/m) (m a power of two below n), at a hashed
    offset in it; every slot when m = n. Mirrors the kernels' ``_sample_position``."""
    j = torch.arange(m, dtype=torch.int64, device=device)
    if m == n:
        return j
    log_m = m.bit_length() - 1
    start = (j * n) >> log_m
    length = (((j + 1) * n) >> log_m) - start
    h = (j * 2654435761 + 1013904223) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    return start + ((h * length) >> 32)


def sample_select_reference(keys: torch.Tensor, k: int, plan: Optional[SamplePlan] = None) -> dict:
    """Reference of the sample select (the Triton kernels' state, step by step) for the k-th largest
    of ``keys`` (≥ 0 valid, −1 masked): the splitters, the counts of the window pass, the bucket
    counts, the answer's bucket and rank in it, whether the window and buffers held it, and ``key``:
    the answer (from :func:`kth_largest` when they did not, as the kernels' exact fallback)."""
    keys = keys.reshape(-1)
    n = keys.numel()
    plan = plan or sample_plan(n, k)
    j = torch.arange(plan.m, dtype=torch.int64, device=keys.device)
    sample = keys[sample_positions(n, plan.m, keys.device)]
    sample = torch.where(sample >= 0, sample, -1 - j)  # distinct, so every sample has one rank
    split = sample.sort(descending=True).values[plan.j_lo:plan.j_hi + 1]
    hi = torch.iinfo(torch.int64).max if plan.upper_open else int(split[0])
    lo = 0 if plan.lower_open else max(int(split[-1]), 0)
    valid = keys >= 0
    window = keys[valid & (keys >= lo) & (keys <= hi)]
    bucket = torch.searchsorted(-split[1:], -window)  # #{splitters past the first that are > key}
    counts = torch.bincount(bucket, minlength=plan.width + 1)
    out = dict(split=split, n_valid=int(valid.sum()), n_above=int((valid & (keys > hi)).sum()),
               n_window=window.numel(), counts=counts, bucket=None, rank=None, n_small=None)
    out["hit"] = out["n_above"] < k <= min(out["n_valid"], out["n_above"] + out["n_window"]) and \
        out["n_window"] <= plan.cap
    if out["hit"]:
        rank = k - out["n_above"]
        target = int((counts.cumsum(0) < rank).sum())
        members = window[bucket == target]
        out.update(bucket=target, rank=rank - int(counts[:target].sum()), n_small=members.numel())
        out["hit"] = members.numel() <= plan.small
    if out["hit"]:
        out["key"] = members.sort(descending=True).values[out["rank"] - 1]
    else:
        out["key"] = kth_largest(keys, k) if k <= out["n_valid"] else torch.tensor(-1, device=keys.device)
    return out


def kth_largest_key(keys: torch.Tensor, k: int, plan: Optional[SamplePlan] = None) -> torch.Tensor:
    """:func:`kth_largest` of selection keys (``selection_keys``, some possibly overwritten with −1), by
    a sample select: no sort of the keys, one pass over them, no host sync. CUDA tensors take the
    Triton kernels of :func:`resu.compile.triton_sample_select.kth_largest_key_triton`; elsewhere
    :func:`sample_select_reference` computes the same steps. ``plan`` overrides :func:`sample_plan`.

    Exact for any keys that are distinct apart from −1 (selection keys are); the kernels rank faster
    when each key also sits at its own slot, as selection keys do."""
    n = keys.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest_key: `k` must be in [1, {n}], got {k}")
    if registry.use_triton(keys):
        from resu.compile.triton_sample_select import kth_largest_key_triton

        return kth_largest_key_triton(keys, k, plan)
    return sample_select_reference(keys, k, plan)["key"].reshape(())


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


# How the two thresholds are found, per device type (absent: "topk"):
# - "topk": kth_largest twice (torch.topk, a sort on large inputs) around consistency_pass_;
# - "key": kth_largest_key twice (the sample select, one pass over the keys each) around the same pass;
# - "fused": on Triton tensors, consistency_select_triton: both selects' passes fused into the
#   consistency pass, so no pass over the keys of their own (elsewhere as "key").
# All three select the same slots: the interpreter tests compare them on random keys with ties and
# every fallback forced, and benchmarks/gpu_optim.py checks on the GPU that "key" and "fused" select
# what "topk" selects (True on an H200 over 22.5 M slots). CUDA takes "fused" (its thresholds: 0.48 ms
# against top-k's 2.19 ms there); the CPU keeps "topk", the reference the others are held to.
SELECT_IMPLS = ("topk", "key", "fused")
select_impl: dict = {"cuda": "fused"}


@torch.no_grad()
def consistency_selection(grad, ema_m, ema_v, config, maximize: bool, shard=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–4 above for one weight: returns ``(keys, threshold, sum_c, n_selected)``; the slots to
    update are ``keys >= threshold`` (exactly ``n_selected`` of them). With ``select_impl`` "fused",
    ``keys`` keep the slots with C > τ and ``threshold`` is max(screen, select) (see
    :func:`resu.compile.triton_consistency_select.consistency_select_triton`): the same slots ≥ threshold.
    With ``shard`` (an FSDP2 row shard's :class:`resu.distributed.select.ShardSelection`), both
    thresholds rank the keys of every rank's shard (:func:`_shard_selection`)."""
    if shard is not None:
        return _shard_selection(grad, ema_m, ema_v, config, maximize, shard)
    n = grad.numel()
    k_screen, k_select = config.screen_count(n), config.select_count(n)
    impl = select_impl.get(grad.device.type, "topk")
    if impl not in SELECT_IMPLS:
        raise ValueError(f"consistency.select_impl: unknown {impl!r}; expected one of {SELECT_IMPLS}")
    if impl == "fused" and registry.use_triton(grad, ema_m, ema_v):
        from resu.compile.triton_consistency_select import consistency_select_triton

        out = consistency_select_triton(grad, ema_m, ema_v, k_screen, k_select, beta=config.beta,
                                        delta=config.delta, tau=config.tau_stable, maximize=maximize)
        return out.keys, out.threshold, out.sum_c, out.n_eligible.clamp(max=k_select)
    kth = kth_largest if impl == "topk" else kth_largest_key
    keys = selection_keys(grad)
    screen = kth(keys, k_screen)
    sum_c, n_eligible = consistency_pass_(
        grad, ema_m, ema_v, keys, screen, beta=config.beta, delta=config.delta, tau=config.tau_stable, maximize=maximize
    )
    threshold = kth(keys, k_select).clamp_min(0)
    return keys, threshold, sum_c, n_eligible.clamp(max=k_select)


def _shard_selection(grad, ema_m, ema_v, config, maximize: bool, shard):
    """:func:`consistency_selection` for one rank's row shard of a weight: the counts are fractions of
    the whole weight's θ slots, each key carries its slot's index in the whole weight's θ order (ties
    break as in one process), and both thresholds are ranked over every rank's keys
    (:func:`resu.distributed.select.kth_largest_across`). ``n_selected`` counts this rank's selected slots."""
    from resu.distributed.select import kth_largest_across

    k_screen, k_select = config.screen_count(shard.n_total), config.select_count(shard.n_total)
    # The low 32 bits of a key are the complement of the slot's index: shifting the index by the
    # shard's offset subtracts the offset.
    keys = (selection_keys(grad) if grad.numel() else grad.new_empty(0, dtype=torch.int64)) - shard.offset
    screen = kth_largest_across(keys, k_screen, shard.group)
    if grad.numel():
        sum_c, _ = consistency_pass_(
            grad, ema_m, ema_v, keys, screen, beta=config.beta, delta=config.delta, tau=config.tau_stable,
            maximize=maximize,
        )
    else:  # a shard without θ slots: nothing to update, but its ranks' selects count on it
        sum_c = grad.new_zeros((), dtype=torch.float32)
    threshold = kth_largest_across(keys, k_select, shard.group).clamp_min(0)
    return keys, threshold, sum_c, (keys >= threshold).sum()
