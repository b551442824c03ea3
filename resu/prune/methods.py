"""The built-in prune methods, registered in :data:`resu.prune.registry.PRUNE_METHODS`.

Each one scores the slots of a 2-D fp32 weight and prunes the lowest scores as the
:class:`~resu.prune.registry.PruneSpec` asks (a sparsity per row or per matrix, or an N:M pattern).
"""

from __future__ import annotations

import torch

from resu.prune.registry import PruneSpec, register_prune_method
from resu.prune.scores import magnitude_scores, wanda_scores
from resu.prune.select import random_pruned, select_pruned


@register_prune_method("magnitude")
def magnitude(weight: torch.Tensor, stat: None, spec: PruneSpec) -> torch.Tensor:
    """Prune the smallest |W|."""
    return select_pruned(magnitude_scores(weight), spec)


@register_prune_method("wanda", statistic="input_sqnorm")
def wanda(weight: torch.Tensor, stat: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """Prune the smallest |W_ij| · ‖X_j‖₂ (Sun et al., 2023); ``stat`` is Σ x_j² per input feature."""
    return select_pruned(wanda_scores(weight, stat.sqrt()), spec)


@register_prune_method("random")
def random(weight: torch.Tensor, stat: None, spec: PruneSpec) -> torch.Tensor:
    """Prune uniformly at random (exactly the spec's count, or ``n`` random slots of every ``m``)."""
    if spec.pattern is None:
        return random_pruned(weight.shape, spec.sparsity, device=weight.device, generator=spec.generator)
    scores = torch.rand(weight.shape, generator=spec.generator, device="cpu").to(weight.device)
    return select_pruned(scores, spec)
