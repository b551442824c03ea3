"""``enter_resu_`` / ``exit_resu_``: starting and ending a resurrection phase."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from resu.api.theta_phase import end_phase, phase_thetas, prepare_phase, start_phase_, weights_in_mode
from resu.core.selective import SelectionConfig
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter


def enter_resu_(
    model: nn.Module,
    epsilon: float = 0.1,
    *,
    generator: Optional[torch.Generator] = None,
    selective: Optional[SelectionConfig] = None,
    init_from: Optional[Mapping[str, torch.Tensor]] = None,
) -> nn.Module:
    """Start a RESU phase: freeze active weights and give every pruned slot a trainable θ, in place.

    θ ~ N(0, (ε·σ_A)²) is written into the pruned slots, where σ_A is the standard deviation of that
    weight's active values (0 if it has fewer than two); with ``init_from``, θ starts from the values
    the pruned slots had before pruning. Train with :class:`resu.ResuAdamW`: it updates θ
    only; gradients of RESU weights hold θ values only (:class:`~resu.tensors.compact_grad.CompactGrad`).

    Args:
        model: a pruned model (every ResuParameter in SPARSE mode, see :func:`resu.prune_`).
        epsilon: θ initialisation scale relative to σ_A, >= 0.
        generator: random generator for θ.
        selective: a :class:`~resu.core.selective.SelectionConfig` to train θ with RESU-Selective: each
            weight is tagged with it (``p._selective``, cleared by :func:`exit_resu_`) and
            :class:`resu.ResuAdamW` applies it where its param group has ``selective=None``.
        init_from: dense weights by parameter name, taken before pruning with
            :func:`resu.snapshot_weights`; θ starts from their values in the pruned slots (then
            ``epsilon`` and ``generator`` are not used). On a pretrained model this starts the phase
            from the unpruned model's function instead of the pruned one's.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad ``epsilon``, ``selective`` or ``init_from``, or a ResuParameter without a mask (DENSE mode: call
            :func:`resu.prune_` first) or already in RESU/QRESU mode. The model is left unchanged
            (also when a step fails midway: the weights already changed are restored).
    """
    params, epsilon = prepare_phase(model, epsilon, selective, generator, "enter_resu_")
    thetas = phase_thetas(params, epsilon, generator, init_from, "enter_resu_")
    start_phase_(params, thetas, ResuParameter._enter_resu_, selective)
    return model


def exit_resu_(model: nn.Module, commit: bool = True) -> nn.Module:
    """End a RESU phase, in place.

    Args:
        model: a model whose ResuParameters are in RESU mode (others are left as they are).
        commit: True keeps θ in the weight and returns it to DENSE mode (the mask is dropped: every
            slot is active); False zeroes θ and returns to SPARSE mode with the same mask.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: no ResuParameter of ``model`` is in RESU mode.
    """
    for p in weights_in_mode(model, ResuMode.RESU, commit, "exit_resu_", "enter_resu_"):
        p._exit_resu_(commit)
        end_phase(p)
    return model
