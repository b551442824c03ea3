"""What the θ phases (RESU and QRESU) share: the initial θ (random, or the values the pruned slots had
before pruning), entry and exit checks."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

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


def snapshot_weights(model, device="cpu") -> dict[str, torch.Tensor]:
    """A copy of every ResuParameter's weight as a plain dense tensor, keyed by parameter name.

    Take it before :func:`resu.prune_` and pass it as ``init_from`` to :func:`resu.enter_resu_`,
    :func:`resu.enter_qresu_` or :func:`resu.recipes.recover_`: θ then starts from the values the pruned
    slots had, so a pruned weight comes back as it was and training continues from there.

    Args:
        model: a model after :func:`resu.sparsify_`.
        device: where the copies live (default the CPU, so the snapshot costs no accelerator memory);
            None keeps each copy on its weight's device.

    Returns:
        ``{name: tensor}`` with one entry per ResuParameter (a tied weight once, under its first name).
    """
    from resu.api.params import require_resu_parameters

    params = require_resu_parameters(model, "snapshot_weights")
    with torch.no_grad():
        return {
            name: p.effective_weight().detach().to(device=device if device is not None else p.device, copy=True)
            for name, p in params
        }


def theta_from(p, name: str, init_from: Mapping[str, torch.Tensor], caller: str) -> torch.Tensor:
    """The values of ``init_from[name]`` in ``p``'s pruned slots (ascending flat order, fp32, on ``p``'s device)."""
    if name not in init_from:
        raise ValueError(
            f"{caller}: init_from has no entry {name!r}; take it with resu.snapshot_weights(model) before "
            "resu.prune_, so that it names every ResuParameter"
        )
    ref = init_from[name]
    if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != tuple(p.shape):
        got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"{caller}: init_from[{name!r}] must be a tensor of shape {tuple(p.shape)}, got {got}")
    pruned = ~p.active_mask.reshape(-1)
    return ref.detach().reshape(-1).to(device=p.device)[pruned.to(p.device)].float()


def phase_thetas(params, epsilon: float, generator, init_from, caller: str) -> list[torch.Tensor]:
    """The starting θ of every weight: ``init_from``'s values in its pruned slots, else ε·σ_A noise.

    All are computed (and ``init_from`` fully checked) before any weight changes.
    """
    if init_from is None:
        return [initial_theta(p, epsilon, generator) for _, p in params]
    if not isinstance(init_from, Mapping):
        raise ValueError(
            f"{caller}: init_from must be a mapping of parameter name to dense weight "
            f"(resu.snapshot_weights(model)), got {type(init_from).__name__}"
        )
    return [theta_from(p, name, init_from, caller) for name, p in params]


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
