"""``stabilize_``: DSnoT-style, training-free refinement of the masks of a pruned model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from resu.api.params import require_resu_parameters
from resu.api.transaction import all_or_nothing
from resu.prune.dsnot import input_gram_matrices, refine_mask
from resu.tensors.mode import ResuMode


@dataclass
class StabilizeStats:
    """What :func:`stabilize_` did: swaps made and the calibration reconstruction error before/after."""

    n_swaps: int
    error_before: float
    error_after: float

    @property
    def relative_error_reduction(self) -> float:
        """``1 − after/before`` (0 when there was no error to reduce)."""
        return 1.0 - self.error_after / self.error_before if self.error_before > 0 else 0.0


def capture_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every ResuParameter's effective weight, by name: take them *before* pruning and pass
    them to :func:`stabilize_` as ``reference``, so revived slots get their pre-pruning values back."""
    return {name: p.effective_weight().clone() for name, p in require_resu_parameters(model, "capture_reference")}


def stabilize_(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    reference: Optional[dict[str, torch.Tensor]] = None,
    max_rounds: int = 50,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> StabilizeStats:
    """Refine the mask of every SPARSE ResuParameter without training, in place (DSnoT).

    Each round swaps, in every row, one pruned slot back in and one active slot out when that
    lowers the layer's output reconstruction error ``‖(W_ref ⊙ P) X‖²`` on the calibration inputs
    (see :mod:`resu.prune.dsnot`); per-row sparsity is unchanged and the error never grows.

    Args:
        model: a pruned model; only weights in SPARSE mode are refined.
        calib: iterable of calibration batches (fed as in :func:`resu.prune_`, or with ``forward_fn``).
        reference: the dense weights before pruning, by parameter name (:func:`capture_reference`).
            A revived slot takes its reference value. Without it the current weights are the
            reference: pruned slots are zero there, so nothing can be gained and no swap is made.
        max_rounds: the most swaps per row, >= 0.
        forward_fn: ``forward_fn(model, batch)`` runs one calibration batch.

    Returns:
        A :class:`StabilizeStats`.

    Raises:
        ValueError: a bad ``max_rounds``, a reference of the wrong shape, no SPARSE weight, or
            calibration batches that miss a weight or hold NaN/inf values. The model is left unchanged
            (also when a step fails midway: every weight is restored).
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"stabilize_: `max_rounds` must be an integer >= 0, got {max_rounds!r}")
    params = [(n, p) for n, p in require_resu_parameters(model, "stabilize_") if p.mode is ResuMode.SPARSE]
    if not params:
        raise ValueError("stabilize_: no weight of `model` is in SPARSE mode; call resu.prune_(model, sparsity) first")
    reference = reference or {}
    for name, p in params:
        ref = reference.get(name)
        if ref is not None and tuple(ref.shape) != tuple(p.shape):
            raise ValueError(
                f"stabilize_: reference[{name!r}] has shape {tuple(ref.shape)}, expected {tuple(p.shape)}"
            )
    grams = input_gram_matrices(model, {id(p): p for _, p in params}, calib, forward_fn)
    results = []
    for name, p in params:
        ref = reference.get(name)
        dense = (ref if ref is not None else p.effective_weight()).to(p.device)
        old = ~p.active_mask
        results.append(refine_mask(dense.reshape(-1, p.shape[-1]), old.reshape(-1, p.shape[-1]), grams[id(p)], max_rounds))
    changed = [(name, p, res) for (name, p), res in zip(params, results) if res.n_swaps]
    with all_or_nothing(p for _, p, _ in changed), torch.no_grad():
        for name, p, res in changed:
            new = res.pruned.view(p.shape)
            ref = reference.get(name)
            revived_values = None
            if ref is not None:  # a revived slot takes its value from before the pruning
                revived = p.active_mask.logical_not_() & ~new
                revived_values = torch.where(revived, ref.to(p.device, p.dtype), p.effective_weight())
            p._apply_pruning_(new)
            if revived_values is not None:
                p.copy_(revived_values)  # SPARSE: the newly pruned slots stay zero
            p.grad = None
    return StabilizeStats(
        n_swaps=sum(r.n_swaps for r in results),
        error_before=sum(r.error_before for r in results),
        error_after=sum(r.error_after for r in results),
    )
