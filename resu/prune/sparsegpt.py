"""SparseGPT: prune a weight and update its surviving weights to reconstruct the layer's output.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023).
For a Linear layer with calibration inputs X (tokens × in), the layer-wise problem is

    min over Ŵ with the chosen mask of  ‖W Xᵀ − Ŵ Xᵀ‖²,   Hessian H = Xᵀ X (the "gram" statistic).

Columns (input features) are processed left to right. Zeroing or keeping weight j of a row, the
Optimal Brain Surgeon update moves the not-yet-processed weights of that row by
``−err · [H⁻¹]_j,j: / [H⁻¹]_jj`` (err = w_j − q_j), where H⁻¹ is the inverse Hessian restricted to
the columns not processed yet. The upper Cholesky factor U of H⁻¹ holds exactly these rows
(U_j,j: ∝ [H⁻¹ restricted]_j,j:), so one factorisation serves every step. Columns go in blocks: the
mask of a block is chosen from ``w² / U_jj²`` (the OBS saliency) when the block starts (N:M: every m
columns, from the already-updated weights), the update runs column by column inside the block, and
the block's accumulated error is pushed to the later columns with one matrix product.
"""

from __future__ import annotations

from typing import Optional

import torch

from resu.prune.registry import PruneResult, PruneSpec, register_prune_method

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMPING = 0.01
MAX_DAMPING_RETRIES = 4  # each retry multiplies the dampening by 10


class SparseGPTError(RuntimeError):
    """The Hessian could not be factorised even with the increased dampening."""


def _inverse_hessian_cholesky(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹, in float64 for stability.

    A failed factorisation (H not positive definite in floating point: too few calibration tokens,
    near-duplicate features) is retried with ten times the dampening, up to
    :data:`MAX_DAMPING_RETRIES` times.
    """
    h = gram.to(torch.float64)
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damping
    for _ in range(MAX_DAMPING_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + (lam * mean_diag) * eye)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return upper
        lam *= 10.0
    raise SparseGPTError(
        f"SparseGPT: the calibration Hessian is not positive definite even with dampening {lam / 10:g}·mean(diag H); "
        "pass more (or more varied) calibration batches, or a larger dampening"
    )


def _block_count(per_column: int, sparsity: float, start: int, stop: int) -> int:
    """How many slots of columns [start, stop) to prune (each column has ``per_column`` slots in the
    ranking) so that the blocks add up to exactly round(sparsity · per_column · in_features)."""
    return round(sparsity * per_column * stop) - round(sparsity * per_column * start)


def _select_block(saliency: torch.Tensor, k: int, scope: str) -> torch.Tensor:
    """Bool mask (saliency's shape) of the ``k`` lowest saliencies per row (``scope="row"``), or of the
    ``k`` lowest over the whole block (``scope="global"``, k counts all rows)."""
    pruned = torch.zeros(saliency.shape, dtype=torch.bool, device=saliency.device)
    if k <= 0:
        return pruned
    if scope == "global":
        pruned.view(-1)[torch.topk(saliency.reshape(-1), k, largest=False).indices] = True
    else:
        pruned.scatter_(1, torch.topk(saliency, k, dim=1, largest=False).indices, True)
    return pruned


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    *,
    scope: str = "row",
    pattern: Optional[tuple[int, int]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damping: float = DEFAULT_DAMPING,
) -> PruneResult:
    """Prune ``weight`` (out × in) with SparseGPT, given the Gram matrix ``gram`` = Σ x xᵀ (in × in).

    Args:
        weight: the weight; not modified.
        gram: Σ over calibration tokens of x xᵀ (any positive scale).
        sparsity: fraction to prune; ignored when ``pattern`` is given (it fixes n/m).
        scope: ``"row"``: every row loses ``round(sparsity · in)`` weights; ``"global"``: the matrix loses
            ``round(sparsity · numel)``, chosen block by block over all rows.
        pattern: ``(n, m)``: prune n of every m consecutive inputs of a row (2:4, 4:8).
        block_size: columns per block (rounded down to a multiple of m for N:M).
        damping: λ, added as λ·mean(diag H) to the diagonal of H.

    Returns:
        :class:`PruneResult` with ``pruned`` (bool, True = pruned) and ``weight`` (fp32, pruned slots 0,
        survivors updated to reconstruct the layer's output on the calibration inputs).

    Raises:
        ValueError: bad shapes, pattern or block size. SparseGPTError: Cholesky failure after retries.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt_prune: `weight` must be 2-D (out × in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if gram is None or tuple(gram.shape) != (cols, cols):
        got = None if gram is None else tuple(gram.shape)
        raise ValueError(f"sparsegpt_prune: `gram` must have shape ({cols}, {cols}) (in × in), got {got}")
    if scope not in ("row", "global"):
        raise ValueError(f"sparsegpt_prune: `scope` must be 'row' or 'global', got {scope!r}")
    if not damping > 0:
        raise ValueError(f"sparsegpt_prune: `damping` must be > 0, got {damping}")
    if pattern is not None:
        n, m = pattern
        if not (0 < n <= m) or cols % m:
            raise ValueError(
                f"sparsegpt_prune: pattern {n}:{m} needs 0 < n ≤ m and in_features ({cols}) divisible by m"
            )
        block_size = max(m, block_size - block_size % m)
    if block_size < 1:
        raise ValueError(f"sparsegpt_prune: `block_size` must be ≥ 1, got {block_size}")

    w = weight.detach().to(torch.float32).clone()
    h = gram.detach().to(device=w.device, dtype=torch.float32).clone()
    # Inputs that never fired carry no information: their weights can go at no cost (as the paper's
    # reference does); a unit diagonal keeps H invertible without coupling them to other columns.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_hessian_cholesky(h, damping).to(torch.float32)
    del h

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    per_column = rows if scope == "global" else 1
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        # The block is held transposed (columns × rows) so that each column is contiguous in memory.
        w_t = w[:, start:stop].T.contiguous()
        u_blk = u[start:stop, start:stop]
        inv_d = 1.0 / u_blk.diagonal()
        err_t = torch.empty_like(w_t)
        if pattern is None:
            k = _block_count(per_column, sparsity, start, stop)
            mask_t = _select_block(w_t.T.pow(2) * inv_d.pow(2), k, scope).T.contiguous()
            # err_j = (w_j − q_j) / U_jj: the pruned entries of w_j, divided by U_jj
            err_scale = mask_t * inv_d.unsqueeze(1)
        else:
            mask_t = torch.zeros_like(w_t, dtype=torch.bool)
            err_scale = torch.zeros_like(w_t)
        for j in range(stop - start):
            if pattern is not None and j % pattern[1] == 0:
                group = slice(j, j + pattern[1])
                sal = (w_t[group].pow(2) * inv_d[group].pow(2).unsqueeze(1)).T
                mask_t[group] = _select_block(sal, pattern[0], "row").T
                err_scale[group] = mask_t[group] * inv_d[group].unsqueeze(1)
            torch.mul(w_t[j], err_scale[j], out=err_t[j])
            # OBS: column j and the remaining columns of the block absorb column j's error
            # (column j itself becomes its pruned value q_j up to rounding; pruned slots are zeroed below).
            w_t[j:].addr_(u_blk[j, j:], err_t[j], alpha=-1.0)
        w[:, start:stop] = w_t.T
        pruned[:, start:stop] = mask_t.T
        # Lazy batch update: the later columns absorb the whole block's error at once.
        w[:, stop:] -= err_t.T @ u[start:stop, stop:]
    w[pruned] = 0.0
    return PruneResult(pruned, w)


@register_prune_method("sparsegpt", statistic="gram")
def sparsegpt(weight: torch.Tensor, stat: Optional[torch.Tensor], spec: PruneSpec) -> PruneResult:
    """Registered ``"sparsegpt"`` method: :func:`sparsegpt_prune` with the spec's sparsity, scope and
    pattern, block size 128 and dampening 0.01."""
    if stat is None:
        raise ValueError("sparsegpt needs the calibration Gram matrix; pass calibration batches (calib=...)")
    return sparsegpt_prune(weight, stat, spec.sparsity, scope=spec.scope, pattern=spec.pattern)
