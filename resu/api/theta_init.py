"""The initial resurrection values θ of a pruned weight: θ ~ N(0, (ε·σ_A)²)."""

from __future__ import annotations

from typing import Optional

import torch


def active_std(p) -> float:
    """Standard deviation of the active values of ResuParameter ``p`` (0 with fewer than two)."""
    active = p._gather_active(p.effective_weight()).float()
    return float(active.std()) if active.numel() > 1 else 0.0


def initial_theta(p, epsilon: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``n_pruned`` fp32 values ~ N(0, (epsilon·σ_A)²) on ``p``'s device (exact +0.0 when the scale is 0)."""
    device = "cpu" if generator is not None else p.device  # a generator lives on one device
    noise = torch.randn(p.n_pruned, generator=generator, dtype=torch.float32, device=device)
    scale = epsilon * active_std(p)
    # scale 0 gives exact +0.0 (noise * 0 would leave -0.0 in half the slots)
    return noise.to(p.device) * scale if scale else torch.zeros(p.n_pruned, device=p.device)
