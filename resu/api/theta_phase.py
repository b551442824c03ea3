"""What the θ phases (RESU and QRESU) share: the initial θ ~ N(0, (ε·σ_A)²), entry and exit checks."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from resu.api.params import require_resu_parameters
from resu.api.transaction import all_or_nothing
from resu.api.validation import check_generator, check_nonnegative, exit_function


def active_std(p) -> float:
    """Standard deviation of the active values of ResuParameter ``p`` (0 with fewer than two)."""
    active = p.effective_weight()[p.active_mask].float()
    return float(active.std()) if active.numel() > 1 else 0.0


def initial_theta(p, epsilon: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``n_pruned`` fp32 values ~ N(0, (epsilon·σ_A)²) on ``p``'s device (exact +0.0 when the scale is 0)."""
    device = "cpu" if generator is not None else p.device  # a generator lives on one device
    noise = torch.randn(p.n_pruned, generator=generator, dtype=torch.float32, device=device)
    scale = epsilon * active_std(p)
    # scale 0 gives exact +0.0 (noise * 0 would leave -0.0 in half the slots)
    return noise.to(p.device) * scale if scale else torch.zeros(p.n_pruned, device=p.device)


def check_selective(selective, caller: str) -> None:
    """A ValueError unless ``selective`` is None or a :class:`~resu.core.selective.SelectionConfig`."""
    from resu.core.selective import SelectionConfig

    if selective is not None and not isinstance(selective, SelectionConfig):
        raise ValueError(
            f"{caller}: `selective` must be a resu.core.selective.SelectionConfig or None, got {type(selective).__name__}"
        )


def check_can_enter(params, caller: str) -> None:
    """Every weight must be pruned (SPARSE mode) to start a θ phase; a ValueError naming the fix otherwise."""
    from resu.tensors.mode import ResuMode

    for name, p in params:
        if p.mode is ResuMode.DENSE:
            raise ValueError(f"{caller}: `{name}` has no mask; call resu.prune_(model, sparsity) first")
        if p.mode.trains_theta:
            raise ValueError(
                f"{caller}: `{name}` is already in {p.mode.name} mode; call resu.{exit_function(p.mode)}(model) first"
            )


def weights_in_mode(model, mode, commit, caller: str, enter_fn: str) -> list:
    """The ResuParameters of ``model`` in ``mode`` (for an exit function), validating ``commit``.

    A ValueError naming the fix when ``commit`` is not a bool or no weight is in ``mode``.
    """
    if not isinstance(commit, bool):
        raise ValueError(f"{caller}: `commit` must be True or False, got {commit!r}")
    params = require_resu_parameters(model, caller)
    found = [p for _, p in params if p.mode is mode]
    if not found:
        raise ValueError(f"{caller}: no weight of `model` is in {mode.name} mode; call resu.{enter_fn}(model) first")
    return found


def prepare_phase(model, epsilon, selective, generator, caller: str) -> tuple[list, float]:
    """The checks every θ-phase entry makes before computing anything: ``epsilon``, ``selective``,
    ``generator``, and every weight pruned and not in a θ phase yet. Returns ``(params, epsilon)``."""
    epsilon = check_nonnegative(epsilon, "epsilon", caller)
    check_selective(selective, caller)
    check_generator(generator, caller)
    params = require_resu_parameters(model, caller)
    check_can_enter(params, caller)
    return params, epsilon


def start_phase_(params, states: list, enter: Callable, selective) -> None:
    """Put every weight of ``params`` (``(name, parameter)`` pairs) in its θ phase with ``enter(p, state)``,
    tagged with ``selective``; all or none of them (a failure midway restores the ones already entered)."""
    with all_or_nothing(p for _, p in params):
        for (_, p), state in zip(params, states):
            enter(p, state)
            p._selective = selective
            p.grad = None


def end_phase(p) -> None:
    """What every exit does after a weight's layout changed: drop its selective tag and stale gradient."""
    p._selective = None
    p.grad = None
