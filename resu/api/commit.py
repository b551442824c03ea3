"""``commit_``: end a RESU phase by merging θ and choosing the next mask (amnesty tournament and friends)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from resu.api.params import require_resu_parameters
from resu.api.validation import check_choice, check_fraction
from resu.prune.amnesty import amnesty_keep, joint_keep, resurrection_budget
from resu.api.theta_phase import end_phase
from resu.prune.calibration import activation_norms
from resu.prune.scores import gradient_scores, magnitude_scores, wanda_scores
from resu.prune.select import n_to_prune
from resu.tensors.mode import ResuMode

STRATEGIES = ("amnesty", "wanda_reprune", "reprune", "simple")
SCORE_TYPES = ("magnitude", "gradient", "wanda")
SCOPES = ("row", "global")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class CommitStats:
    """What a commit did, summed over the committed weights.

    ``n_resurrected``: slots pruned before the commit and active after; ``n_active_kept``: slots
    active before and after; ``resurrection_rate = n_resurrected / n_pruned_before``;
    ``mask_churn``: fraction of all slots whose pruned/active state changed;
    ``resurrection_budget``: the r(c) used by the tournament (0 for the other strategies).
    """

    n_resurrected: int
    n_active_kept: int
    resurrection_rate: float
    mask_churn: float
    resurrection_budget: float
    n_pruned_before: int
    n_pruned_after: int
    numel: int

    @property
    def sparsity(self) -> float:
        """Fraction of pruned slots after the commit."""
        return self.n_pruned_after / self.numel if self.numel else 0.0


def commit_(
    model: nn.Module,
    strategy: str = "amnesty",
    *,
    cycle: int = 0,
    num_cycles: int = 1,
    target_sparsity: Optional[float] = None,
    r_start: float = 0.10,
    r_end: float = 0.02,
    score_type: str = "magnitude",
    calib: Optional[Iterable[Any]] = None,
    scope: str = "row",
    loss_fn: Optional[LossFn] = None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> CommitStats:
    """Merge θ into every weight in RESU (or QRESU) mode and choose its next mask, in place.

    Strategies:

    - ``"amnesty"``: scores all merged slots, then the previously active slots compete for
      ``n_keep·(1 − r)`` places and the resurrected ones for ``n_keep·r`` (leftover places go to the
      other group), with ``r = r(cycle)`` decaying linearly from ``r_start`` to ``r_end`` over
      ``num_cycles`` (:mod:`resu.prune.amnesty`).
    - ``"wanda_reprune"``: merge all θ, then one joint Wanda ranking (needs ``calib``).
    - ``"reprune"``: one joint ranking by ``score_type`` (no reserved places; the no-amnesty ablation).
    - ``"simple"``: merge all θ and prune nothing: every slot is active afterwards.

    Args:
        model: a model with ResuParameters in RESU/QRESU mode (weights in other modes are untouched).
        target_sparsity: sparsity after the commit, in [0, 1]; None keeps each weight's current
            count of active slots (per row with ``scope="row"``). Must be None or 0 for ``"simple"``.
        score_type: ``"magnitude"`` |W|, ``"gradient"`` |W|·|∇W| (needs ``calib`` and ``loss_fn``),
            or ``"wanda"`` |W|·‖X‖ (needs ``calib``); scores are taken on the merged weights.
        calib: calibration batches for Wanda/gradient scores.
        scope: ``"row"`` keeps the same count in every row, ``"global"`` ranks each whole matrix.
        loss_fn: ``loss_fn(model, batch) -> loss`` for gradient scores.
        forward_fn: ``forward_fn(model, batch)`` for Wanda's calibration pass (default as in
            :func:`resu.prune_`).

    Returns:
        A :class:`CommitStats`. Committed weights are in SPARSE mode (``"simple"``: with no pruned slot).

    Raises:
        ValueError: bad arguments, missing ``calib``/``loss_fn``, or no weight in RESU/QRESU mode;
            the model is left unchanged.
    """
    check_choice(strategy, "strategy", STRATEGIES, "commit_")
    check_choice(score_type, "score_type", SCORE_TYPES, "commit_")
    check_choice(scope, "scope", SCOPES, "commit_")
    if target_sparsity is not None:
        target_sparsity = check_fraction(target_sparsity, "target_sparsity", "commit_")
    budget = resurrection_budget(cycle, num_cycles, r_start, r_end)
    if strategy == "simple" and target_sparsity:
        raise ValueError(
            "commit_: strategy='simple' keeps every merged slot; pass target_sparsity=None (or 0), or use "
            "strategy='amnesty' to re-prune"
        )
    scoring = "wanda" if strategy == "wanda_reprune" else score_type
    if strategy != "simple":
        if scoring in ("wanda", "gradient") and calib is None:
            raise ValueError(f"commit_: {scoring} scores need calibration data; pass calib=<iterable of batches>")
        if scoring == "gradient" and loss_fn is None:
            raise ValueError("commit_: score_type='gradient' needs loss_fn=(model, batch) -> loss")
    params = require_resu_parameters(model, "commit_")
    in_theta = [(n, p) for n, p in params if p.mode.trains_theta]
    if not in_theta:
        raise ValueError("commit_: no weight of `model` is in RESU mode; call resu.enter_resu_(model) first")
    if calib is not None:
        calib = list(calib)  # read more than once
        if scoring in ("wanda", "gradient") and strategy != "simple" and not calib:
            raise ValueError("commit_: `calib` yielded no batches; pass at least one calibration batch")
    norms = None
    if strategy != "simple" and scoring == "wanda":
        # θ sits in the forward already, so activations now are those of the merged model; taking
        # them before merging means a calibration error leaves the model unchanged.
        norms = activation_norms(model, {id(p): p for _, p in in_theta}, calib, forward_fn, caller="commit_")
    was_pruned = {name: p._pruned_bool().view(p.shape).clone() for name, p in in_theta}
    _merge_theta_(model, [p for _, p in in_theta])
    return select_after_merge_(
        model,
        [(n, p, was_pruned[n]) for n, p in in_theta],
        strategy,
        budget=budget if strategy == "amnesty" else 0.0,
        target_sparsity=target_sparsity,
        score_type=scoring,
        calib=calib,
        scope=scope,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        activation_norms_by_id=norms,
    )


def _merge_theta_(model: nn.Module, params: list) -> None:
    """θ becomes part of the weight: RESU weights go to DENSE mode; QRESU weights are dequantized."""
    for p in params:
        if p.mode is ResuMode.RESU:
            p._exit_resu_(True)
            end_phase(p)  # as exit_resu_ does: no stale gradient or selective tag
    if any(p.mode is ResuMode.QRESU for p in params):
        from resu import exit_qresu_  # QRESU support lives with the quantized storage

        exit_qresu_(model, commit=True)


def select_after_merge_(
    model: nn.Module,
    merged: list[tuple[str, Any, torch.Tensor]],
    strategy: str,
    *,
    budget: float,
    target_sparsity: Optional[float],
    score_type: str,
    calib: Optional[Iterable[Any]],
    scope: str,
    loss_fn: Optional[LossFn] = None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    activation_norms_by_id: Optional[dict[int, torch.Tensor]] = None,
) -> CommitStats:
    """Choose and apply the next mask of weights whose θ is already merged (``merged`` holds
    ``(name, parameter, pruned-before mask)``); the second half of :func:`commit_`."""
    if calib is not None and not isinstance(calib, (list, tuple)):
        calib = list(calib)  # may be read twice (scores)
    scores = {}
    if strategy != "simple":
        scores = _scores(model, [p for _, p, _ in merged], score_type, calib, loss_fn, forward_fn, activation_norms_by_id)
    totals = dict(resurrected=0, kept=0, before=0, after=0, churn=0, numel=0)
    new_masks = []
    for name, p, old in merged:
        if strategy == "simple":
            keep = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        else:
            keep = _tournament(scores[id(p)], old, strategy, budget, target_sparsity, scope)
        new_masks.append((p, old, ~keep))
    with torch.no_grad():
        for p, old, new in new_masks:
            p._apply_pruning_(new)
            p.grad = None
            totals["resurrected"] += int((old & ~new).sum())
            totals["kept"] += int((~old & ~new).sum())
            totals["before"] += int(old.sum())
            totals["after"] += int(new.sum())
            totals["churn"] += int((old ^ new).sum())
            totals["numel"] += old.numel()
    return CommitStats(
        n_resurrected=totals["resurrected"],
        n_active_kept=totals["kept"],
        resurrection_rate=totals["resurrected"] / totals["before"] if totals["before"] else 0.0,
        mask_churn=totals["churn"] / totals["numel"] if totals["numel"] else 0.0,
        resurrection_budget=budget,
        n_pruned_before=totals["before"],
        n_pruned_after=totals["after"],
        numel=totals["numel"],
    )


def _tournament(scores, was_pruned, strategy, budget, target_sparsity, scope) -> torch.Tensor:
    shape = scores.shape
    rows = scores.reshape(1, -1) if scope == "global" else scores.reshape(-1, shape[-1])
    old = was_pruned.reshape(rows.shape)
    if target_sparsity is None:
        n_keep = (~old).sum(dim=1)
    else:
        n_keep = torch.full((rows.shape[0],), rows.shape[1] - n_to_prune(rows.shape[1], target_sparsity), device=rows.device)
    if strategy == "amnesty":
        keep = amnesty_keep(rows, old, n_keep, budget)
    else:
        keep = joint_keep(rows, n_keep)
    return keep.view(shape)


def _scores(model, params, score_type, calib, loss_fn, forward_fn, norms=None) -> dict[int, torch.Tensor]:
    if score_type == "magnitude":
        return {id(p): magnitude_scores(p.effective_weight()) for p in params}
    if score_type == "wanda":
        if norms is None:
            norms = activation_norms(model, {id(p): p for p in params}, calib, forward_fn, caller="commit_")
        return {id(p): wanda_scores(p.effective_weight(), norms[id(p)]) for p in params}
    grads = _accumulated_grads(model, params, calib, loss_fn)
    return {id(p): gradient_scores(p.effective_weight(), grads[id(p)]) for p in params}


def _accumulated_grads(model, params, calib, loss_fn) -> dict[int, torch.Tensor]:
    """Loss gradients of ``params`` summed over ``calib`` (``.grad`` fields are not touched)."""
    sums = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}
    n_batches = 0
    with torch.enable_grad():
        for batch in calib:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    sums[id(p)] += g.float()
            n_batches += 1
    if n_batches == 0:
        raise ValueError("commit_: `calib` yielded no batches; gradient scores need at least one batch")
    return sums
