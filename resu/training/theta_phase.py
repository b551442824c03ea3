"""The RESU phase of a cycle: put θ in the pruned slots and train it with a fresh ResuAdamW."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

import resu
from resu.api.params import resu_parameters
from resu.optim.selective import SelectionStats
from resu.training.config import RESUConfig
from resu.training.stream import BatchStream


@dataclass
class ThetaPhaseResult:
    """Loss and update counts of one RESU phase."""

    mean_loss: float
    n_updates: int
    mean_consistency: float
    mean_selection_ratio: float
    was_pruned: Optional[dict[str, torch.Tensor]] = None  # set when active weights trained too


def enter_theta_mode_(model: nn.Module, config: RESUConfig, generator: torch.Generator) -> Optional[dict[str, torch.Tensor]]:
    """Start the phase: RESU mode (or QRESU with ``use_qresu``).

    With ``freeze_active_during_resu=False`` θ is written into the pruned slots and the weights go
    straight back to DENSE mode, so active weights train along; the pruned-before masks are returned
    for the commit.
    """
    if config.use_qresu:
        from resu import enter_qresu_  # quantized RESU lives with the quantized storage formats

        enter_qresu_(
            model,
            bits=config.qresu_bits,
            scheme=config.qresu_scheme,
            group_size=config.qresu_group_size,
            epsilon=config.resu_epsilon,
        )
        return None
    resu.enter_resu_(model, epsilon=config.resu_epsilon, generator=generator)
    if config.freeze_active_during_resu:
        return None
    was_pruned = {name: ~p.active_mask for name, p in resu_parameters(model)}
    resu.exit_resu_(model, commit=True)
    return was_pruned


def _theta_optimizer(model: nn.Module, config: RESUConfig) -> resu.ResuAdamW:
    kwargs: dict[str, Any] = dict(lr=config.resu_lr, weight_decay=config.weight_decay)
    if config.use_selective:
        from resu.core.selective import SelectionConfig  # selective updates live with ResuAdamW

        kwargs["selective"] = SelectionConfig(
            beta=config.selective_beta,
            delta=config.selective_delta,
            tau_stable=config.selective_tau,
            k_screen_ratio=config.selective_k_screen_ratio,
            k_select_ratio=config.selective_k_select_ratio,
        )
    return resu.ResuAdamW(model.parameters(), **kwargs)


def _trainable_slots(model: nn.Module) -> int:
    total = 0
    for _, p in resu_parameters(model):
        total += p.n_pruned if p.mode.trains_theta else p.numel()
    return total


def run_theta_phase(
    model: nn.Module,
    config: RESUConfig,
    stream: BatchStream,
    steps: int,
    train_fn: Callable[[nn.Module, Any], torch.Tensor],
    generator: torch.Generator,
    bar,
) -> ThetaPhaseResult:
    """Enter RESU mode, train θ for ``steps`` batches with a fresh :class:`resu.ResuAdamW`, and return.

    The weights are left with θ in place (RESU/QRESU mode, or DENSE with
    ``freeze_active_during_resu=False``), ready for the commit. The user's optimizer is not used here.
    """
    was_pruned = enter_theta_mode_(model, config, generator)
    opt = _theta_optimizer(model, config)
    slots = _trainable_slots(model)
    loss_sum = None  # summed on the loss's device: no host sync per step
    n_updates = 0
    selection = SelectionStats()  # summed over steps on the device: one host sync after the loop
    model.train()
    for _ in range(steps):
        loss = train_fn(model, stream.next())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_loss = loss.detach().double()
        loss_sum = step_loss if loss_sum is None else loss_sum + step_loss
        if config.use_selective:
            selection.accumulate(opt.selection_counts())
        else:
            n_updates += slots
        bar.update(1)
    opt.zero_grad(set_to_none=True)
    consistency = ratio = math.nan  # no step, no statistics
    if config.use_selective and loss_sum is not None:
        # Every step has the same θ slots, so the totals' ratios are the means of the per-step ones.
        sel = selection.as_dict()
        consistency, ratio, n_updates = sel["mean_consistency"], sel["fraction_selected"], sel["n_selected"]
    return ThetaPhaseResult(
        mean_loss=float(loss_sum) / steps if loss_sum is not None else math.nan,
        n_updates=n_updates,
        mean_consistency=consistency,
        mean_selection_ratio=ratio if config.use_selective else 1.0,
        was_pruned=was_pruned,
    )
