"""RESU-Selective inside ResuAdamW: one weight's selective θ step, its optimizer state, its statistics.

State of a selective weight (``optimizer.state[p]``, all tensors, so ``state_dict()`` resumes bitwise):

- ``step``, ``exp_avg``, ``exp_avg_sq``: Adam over the θ slots (consistency: sized p, the θ slot
  count) or over the subset (static strategies: sized k).
- consistency: ``selection_m``, ``selection_v`` — the gradient and |gradient| EMAs, sized p.
- static: ``subset`` (k ascending θ indices), ``subset_positions`` (where they sit in the flattened
  θ holder), ``subset_choices`` (how many subsets were chosen so far) and, for ``"random"``,
  ``subset_seed`` (each choice draws from a generator seeded with seed + choices).
- ``selection``: which layout the Adam states have, ``(strategy index, k)``.

Step counter: ``step`` is per weight and counts the selective steps of that weight (the bias
correction of a slot updated at step t is that of step t, as in sparse Adam variants); a coordinate
that is not selected gets no update and its Adam states stay untouched. On a static refresh the
Adam states and the step counter restart for the new subset.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from resu.optim.adamw_step import Target, adamw_step_, key_at_least, positions_in_target, subset
from resu.optim.consistency import consistency_selection, selection_keys
from resu.optim.selection_config import STRATEGIES, SelectionConfig

EMA_KEYS = ("selection_m", "selection_v")
SUBSET_KEYS = ("subset", "subset_positions", "subset_choices", "subset_seed")
SELECTIVE_KEYS = EMA_KEYS + SUBSET_KEYS
INTEGER_KEYS = SUBSET_KEYS  # kept integral across load_state_dict (it casts floating params' states)


def state_layout(config: SelectionConfig, n_slots: int) -> tuple[tuple[int, int], int]:
    """(layout tag, Adam state size) of a weight with ``n_slots`` θ slots under ``config``.

    The tag is ``(strategy index in STRATEGIES, k)`` (k = 0 for consistency): plain ints, because
    ``Optimizer.load_state_dict`` rebuilds strings in the state as generators of characters."""
    code = STRATEGIES.index(config.strategy)
    if config.is_static:
        k = config.select_count(n_slots)
        return (code, k), k
    return (code, 0), n_slots


class SelectionStats:
    """Per-step selection statistics, accumulated on the device; one host sync when read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._device_sums: dict[torch.device, torch.Tensor] = {}  # device -> [ΣC, n_selected] (float64)
        self._n_slots = 0
        self._n_consistency_slots = 0
        self._n_static_selected = 0

    def add_consistency(self, sum_c: torch.Tensor, n_selected: torch.Tensor, n_slots: int) -> None:
        pair = torch.stack((sum_c.to(torch.float64), n_selected.to(torch.float64)))
        acc = self._device_sums.get(pair.device)
        if acc is None:
            self._device_sums[pair.device] = pair
        else:
            acc.add_(pair)
        self._n_slots += n_slots
        self._n_consistency_slots += n_slots

    def add_static(self, n_selected: int, n_slots: int) -> None:
        self._n_slots += n_slots
        self._n_static_selected += n_selected

    def accumulate(self, other: "SelectionStats") -> None:
        """Add ``other``'s counts to these (device sums stay on their device: no host sync), so the
        statistics of many steps read back with one sync in :meth:`as_dict`."""
        for device, acc in other._device_sums.items():
            mine = self._device_sums.get(device)
            self._device_sums[device] = acc.clone() if mine is None else mine.add_(acc)
        self._n_slots += other._n_slots
        self._n_consistency_slots += other._n_consistency_slots
        self._n_static_selected += other._n_static_selected

    def as_dict(self) -> dict:
        sum_c, n_selected = 0.0, float(self._n_static_selected)
        for acc in self._device_sums.values():
            a, b = acc.tolist()
            sum_c, n_selected = sum_c + a, n_selected + b
        mean_c = sum_c / self._n_consistency_slots if self._n_consistency_slots else 0.0
        return {
            "mean_consistency": mean_c if math.isfinite(mean_c) else 0.0,
            "fraction_selected": n_selected / self._n_slots if self._n_slots else 0.0,
            "n_selected": int(round(n_selected)),
            "n_slots": self._n_slots,
        }


def _ensure_ema(state: dict, like: torch.Tensor, n_slots: int) -> None:
    for key in EMA_KEYS:
        if key not in state or state[key].numel() != n_slots:
            state[key] = torch.zeros(n_slots, dtype=like.dtype, device=like.device)


def _choose_subset_(target: Target, grad: torch.Tensor, state: dict, config: SelectionConfig) -> None:
    """Pick the k trained θ slots (ascending) and restart the Adam states for them."""
    n = grad.numel()
    k = config.select_count(n)
    choices = state.setdefault("subset_choices", torch.zeros((), dtype=torch.int64))
    if config.strategy == "random":
        if "subset_seed" not in state:
            state["subset_seed"] = torch.randint(0, 2**62, (), dtype=torch.int64)
        gen = torch.Generator().manual_seed(int(state["subset_seed"]) + int(choices))
        subset = torch.randperm(n, generator=gen)[:k].to(grad.device)
    else:  # "magnitude": the k largest |g| now, ties to the lower index
        subset = torch.topk(selection_keys(grad), k, sorted=False).indices
    subset = subset.sort().values
    state["subset"] = subset
    state["subset_positions"] = positions_in_target(target, subset)
    choices += 1
    state["step"].zero_()
    state["exp_avg"].zero_()
    state["exp_avg_sq"].zero_()


@torch.no_grad()
def selective_step_(
    target: Target,
    grad: torch.Tensor,
    state: dict,
    config: SelectionConfig,
    hyper: dict,
    stats: Optional[SelectionStats] = None,
    shard=None,
) -> None:
    """One RESU-Selective step of one weight: ``grad`` is its compact θ gradient (p values), ``state``
    its optimizer state laid out by :func:`state_layout` (``step`` not yet incremented). ``shard``: a
    :class:`resu.distributed.select.ShardSelection` when the weight is an FSDP2 row shard; the
    consistency thresholds are then ranked over every rank's θ slots (static strategies still choose
    their subset per shard)."""
    n = grad.numel()
    if n == 0:
        if shard is not None and not config.is_static:
            # A rank whose shard has no θ slots still takes part in the other ranks' threshold selects.
            consistency_selection(grad, grad, grad, config, hyper["maximize"], shard=shard)
        return
    grad = grad.contiguous()
    if config.is_static:
        every = config.refresh_every
        if "subset" not in state or (every is not None and int(state["step"]) >= every):
            _choose_subset_(target, grad, state, config)
        state["step"] += 1
        adamw_step_(target, grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]),
                    selection=subset(state["subset"], state["subset_positions"]), **hyper)
        if stats is not None:
            stats.add_static(state["subset"].numel(), n)
        return
    _ensure_ema(state, state["exp_avg"], n)
    state["step"] += 1
    keys, threshold, sum_c, n_selected = consistency_selection(
        grad, state["selection_m"], state["selection_v"], config, hyper["maximize"], shard=shard
    )
    adamw_step_(target, grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]),
                selection=key_at_least(keys, threshold), **hyper)
    if stats is not None:
        stats.add_consistency(sum_c, n_selected, n)
