"""Turning scores into a pruned set of a given sparsity."""

from __future__ import annotations

from typing import Optional

import torch


def n_to_prune(count: int, sparsity: float) -> int:
    """How many of ``count`` slots sparsity ``sparsity`` prunes (rounded to nearest)."""
    return min(count, max(0, int(round(sparsity * count))))


def lowest_scores(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Boolean tensor of ``scores``' shape, True at the slots to prune.

    ``scope="row"`` prunes ``round(sparsity · in_features)`` slots of every row (last dim);
    ``scope="global"`` prunes ``round(sparsity · numel)`` slots over the whole tensor.
    """
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if scope == "global":
        k = n_to_prune(scores.numel(), sparsity)
        if k:
            pruned[torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices] = True
        return pruned.view(scores.shape)
    if scores.numel() == 0:
        return pruned.view(scores.shape)
    rows = scores.reshape(-1, scores.shape[-1]) if scores.dim() else scores.reshape(1, 1)
    k = n_to_prune(rows.shape[1], sparsity)
    pruned = pruned.view(rows.shape)
    if k:
        idx = torch.topk(rows, k, dim=1, largest=False, sorted=False).indices
        pruned.scatter_(1, idx, True)
    return pruned.view(scores.shape)


def random_pruned(shape, sparsity: float, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Boolean tensor with exactly ``round(sparsity · numel)`` randomly placed True (pruned) slots."""
    numel = 1
    for d in shape:
        numel *= d
    k = n_to_prune(numel, sparsity)
    perm = torch.randperm(numel, generator=generator, device="cpu")[:k]
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[perm] = True
    return pruned.view(tuple(shape)).to(device)


def n_m_pruned(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M semi-structured pruning: in every group of ``m`` consecutive slots of a row (last dim),
    prune the ``n`` lowest-scoring ones. The last dim must be divisible by ``m``."""
    if scores.shape[-1] % m:
        raise ValueError(f"{n}:{m} pruning needs in_features divisible by {m}, got {scores.shape[-1]}")
    groups = scores.reshape(-1, m)
    idx = torch.topk(groups, n, dim=1, largest=False, sorted=False).indices
    pruned = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    pruned.scatter_(1, idx, True)
    return pruned.view(scores.shape)


def select_pruned(scores: torch.Tensor, spec) -> torch.Tensor:
    """The pruned slots a :class:`~resu.prune.registry.PruneSpec` asks for, lowest ``scores`` first:
    ``n`` of every ``m`` consecutive inputs with an N:M ``spec.pattern``, else ``spec.sparsity`` per row
    or per matrix (``spec.scope``)."""
    if spec.pattern is not None:
        return n_m_pruned(scores, *spec.pattern)
    return lowest_scores(scores, spec.sparsity, spec.scope)
