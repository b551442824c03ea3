"""DSnoT-style stabilization: training-free mask refinement by pruned/active swaps.

After one-shot pruning, a weight's layer output drifts from the dense one by ``(W ⊙ P) x``, where P
marks the pruned slots. DSnoT (Zhang et al., "Dynamic Sparse No Training", 2024) shrinks that drift
without any training, by swapping a pruned slot back in and an active slot out, row by row, keeping
every row's sparsity.

Here each swap is chosen on the exact reconstruction error over the calibration activations X
rather than on DSnoT's expected-value surrogate: with ``H = Σ x xᵀ`` (input Gram matrix) the error of
row i is ``E_i = p_iᵀ H p_i`` with ``p_i = W_i ⊙ P_i``, and both the gain of reviving slot j and the
cost of pruning slot k afterwards are closed-form from ``g_i = H p_i``. Every round picks, per row,
the best revival and then the cheapest removal, and keeps the swap only if ``E_i`` decreases, so the
error never grows; a row stops at its first round without improvement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from resu.prune.calibration import linear_input_statistics

_RELATIVE_TOLERANCE = 1e-6


@dataclass
class RefineResult:
    """Outcome of :func:`refine_mask` for one weight."""

    pruned: torch.Tensor
    n_swaps: int
    error_before: float
    error_after: float


def input_gram_matrices(
    model: nn.Module,
    params: dict[int, torch.Tensor],
    calib: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> dict[int, torch.Tensor]:
    """``H = Σ x xᵀ`` (fp32) of the inputs of every Linear layer whose weight is in ``params`` (keyed by id).

    Forward hooks record the inputs over the ``calib`` batches (fed through ``forward_fn``, see
    :func:`resu.prune.calibration.default_forward`); the model runs in eval mode and gets its training
    flags back after.
    """
    return linear_input_statistics(model, params, "gram", calib, forward_fn, "stabilize_")


@torch.no_grad()
def refine_mask(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor, max_rounds: int) -> RefineResult:
    """Greedy row-wise swaps that lower ``Σ_i (W_i ⊙ P_i) H (W_i ⊙ P_i)ᵀ``.

    Args:
        weight: the dense reference weight ``(out, in)`` (the values before pruning).
        pruned: bool ``(out, in)``, True at pruned slots.
        gram: ``(in, in)`` input Gram matrix H.
        max_rounds: the most swaps per row.

    Returns:
        The refined pruned mask (same count per row), the number of swaps, and the error before/after.
    """
    w = weight.detach().float().reshape(pruned.shape)
    p = pruned.clone().to(torch.bool)
    h = gram.to(w.device, torch.float32)
    diag = h.diagonal()
    g = (w * p) @ h
    err = ((w * p) * g).sum(dim=1)
    error_before = float(err.sum())
    running = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    inf = torch.tensor(float("inf"), device=w.device)
    rows = torch.arange(w.shape[0], device=w.device)
    n_swaps = 0
    self_term = w * w * diag
    for _ in range(max_rounds):
        grow_cost = torch.where(p, self_term - 2 * w * g, inf)
        j = grow_cost.argmin(dim=1)
        w_j = w[rows, j]
        h_j = h[j]
        prune_cost = torch.where(p, inf, self_term + 2 * w * g - 2 * w_j[:, None] * w * h_j)
        prune_cost[rows, j] = inf  # the slot just revived stays active
        k = prune_cost.argmin(dim=1)
        delta = grow_cost[rows, j] + prune_cost[rows, k]
        better = running & torch.isfinite(delta) & (delta < -_RELATIVE_TOLERANCE * err.abs().clamp_min(1e-30))
        if not bool(better.any()):
            break
        r = rows[better]
        jr, kr = j[better], k[better]
        p[r, jr] = False
        p[r, kr] = True
        g[r] += w[r, kr][:, None] * h[kr] - w[r, jr][:, None] * h[jr]
        err[r] += delta[better]
        running &= better
        n_swaps += int(r.numel())
    error_after = float(((w * p) * ((w * p) @ h)).sum())
    return RefineResult(p, n_swaps, error_before, error_after)
