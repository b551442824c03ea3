"""Importance scores: a weight slot with a lower score is pruned first."""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, activation_norms: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| · ‖X_j‖₂, where ``activation_norms[j]`` is the L2 norm of input feature j over the
    calibration tokens (Sun et al., 2023)."""
    if activation_norms.shape != weight.shape[-1:]:
        raise ValueError(
            f"activation_norms must have shape ({weight.shape[-1]},) (the weight's in_features), "
            f"got {tuple(activation_norms.shape)}"
        )
    return weight.detach().abs().float() * activation_norms.to(weight.device, torch.float32)


def gradient_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order saliency |W| · |∇W|: how much the loss moves if a slot is set to zero."""
    if grad.shape != weight.shape:
        raise ValueError(f"grad must have the weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    return weight.detach().abs().float() * grad.detach().abs().to(weight.device, torch.float32)
