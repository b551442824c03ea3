"""``commit_``: end a RESU phase by merging θ and choosing the next mask (amnesty tournament and friends)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

import resu.prune  # noqa: F401  (registers the built-in commit strategies)
from resu.api.params import require_resu_parameters
from resu.api.theta_phase import end_phase
from resu.api.transaction import all_or_nothing
from resu.api.validation import check_choice, check_fraction
from resu.prune.amnesty import resurrection_budget
from resu.prune.calibration import activation_norms
from resu.prune.registry import COMMIT_STRATEGIES, CommitStrategy
from resu.prune.scores import gradient_scores, magnitude_scores, wanda_scores
from resu.prune.select import n_to_prune
from resu.tensors.mode import ResuMode

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

    Strategies (registered in :data:`resu.prune.registry.COMMIT_STRATEGIES`; add one with
    :func:`resu.prune.registry.register_commit_strategy`):

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
            the model is left unchanged. Any error while scoring (a ``loss_fn`` that raises, a
            calibration batch of the wrong shape) leaves it unchanged too: θ stays unmerged and the
            masks stay as they were.
    """
    options = dict(cycle=cycle, num_cycles=num_cycles, target_sparsity=target_sparsity, r_start=r_start, r_end=r_end,
                   score_type=score_type, calib=calib, scope=scope, loss_fn=loss_fn, forward_fn=forward_fn)
    plan, calib = _CommitPlan.check(strategy, options)
    params = require_resu_parameters(model, "commit_")
    in_theta = [(n, p) for n, p in params if p.mode.trains_theta]
    if not in_theta:
        raise ValueError("commit_: no weight of `model` is in RESU mode; call resu.enter_resu_(model) first")
    calib = plan.read(calib)
    merged = [(name, p, ~p.active_mask) for name, p in in_theta]
    # θ sits in the forward and in the effective weights already: scores that need no gradient are
    # the merged model's scores, taken before anything changes.
    scores = None if plan.scoring == "gradient" else _scores(model, plan, [p for _, p in in_theta], calib, None, forward_fn)
    with all_or_nothing(p for _, p in in_theta):
        for _, p in in_theta:
            _merge_theta_(p)
        return _choose_masks_(model, plan, merged, scores, calib, loss_fn, forward_fn)


def commit_merged_(model: nn.Module, merged: list[tuple[str, Any, torch.Tensor]], strategy: str, options: dict) -> CommitStats:
    """:func:`commit_` for weights whose θ is merged already (DENSE mode, active weights trained along):
    ``merged`` holds ``(name, parameter, pruned-before mask)``; ``options`` holds every keyword argument
    of :func:`commit_` (``cycle`` … ``forward_fn``)."""
    plan, calib = _CommitPlan.check(strategy, options)
    calib = plan.read(calib)
    with all_or_nothing(p for _, p, _ in merged):
        return _choose_masks_(model, plan, merged, None, calib, options.get("loss_fn"), options.get("forward_fn"))


@dataclass(frozen=True)
class _CommitPlan:
    """A commit's checked arguments: the strategy entry, what it scores by, where it prunes to."""

    strategy: CommitStrategy
    scoring: Optional[str]
    scope: str
    target_sparsity: Optional[float]
    budget: float

    @classmethod
    def check(cls, strategy: str, options: dict) -> tuple["_CommitPlan", Optional[Iterable[Any]]]:
        """Every argument check of a commit (``options``: all of :func:`commit_`'s keyword arguments),
        before anything is read or changed. Returns the plan and the calibration batches."""
        score_type, scope, target_sparsity = options["score_type"], options["scope"], options["target_sparsity"]
        calib, loss_fn = options["calib"], options["loss_fn"]
        entry = COMMIT_STRATEGIES.get(strategy, "commit_", "strategy")
        check_choice(score_type, "score_type", SCORE_TYPES, "commit_")
        check_choice(scope, "scope", SCOPES, "commit_")
        if target_sparsity is not None:
            target_sparsity = check_fraction(target_sparsity, "target_sparsity", "commit_")
        budget = resurrection_budget(options["cycle"], options["num_cycles"], options["r_start"], options["r_end"])
        if not entry.prunes and target_sparsity:
            raise ValueError(
                f"commit_: strategy={strategy!r} keeps every merged slot; pass target_sparsity=None (or 0), or use "
                "strategy='amnesty' to re-prune"
            )
        scoring = entry.scoring(score_type)
        if entry.needs_calibration(score_type) and calib is None:
            raise ValueError(f"commit_: {scoring} scores need calibration data; pass calib=<iterable of batches>")
        if scoring == "gradient" and loss_fn is None:
            raise ValueError("commit_: score_type='gradient' needs loss_fn=(model, batch) -> loss")
        return cls(entry, scoring, scope, target_sparsity, budget if entry.uses_budget else 0.0), calib

    def read(self, calib: Optional[Iterable[Any]]) -> Optional[list]:
        """The calibration batches as a list (they may be read twice); an empty one is refused when needed."""
        if calib is None:
            return None
        calib = list(calib)
        if self.scoring in ("wanda", "gradient") and not calib:
            raise ValueError("commit_: `calib` yielded no batches; pass at least one calibration batch")
        return calib


def _merge_theta_(p) -> None:
    """θ becomes part of the weight: a RESU weight goes to DENSE mode; a QRESU one is dequantized first."""
    if p.mode is ResuMode.RESU:
        p._exit_resu_(True)
    else:
        p._exit_qresu_(True)
    end_phase(p)  # as exit_resu_ / exit_qresu_ do: no stale gradient or selective tag


def _choose_masks_(model, plan: _CommitPlan, merged, scores, calib, loss_fn, forward_fn) -> CommitStats:
    """Choose and apply the next mask of the merged weights (``(name, parameter, pruned-before)``)."""
    if plan.strategy.prunes and scores is None:
        scores = _scores(model, plan, [p for _, p, _ in merged], calib, loss_fn, forward_fn)
    new_masks = []
    for _, p, old in merged:
        if plan.strategy.prunes:
            keep = _keep(plan, scores[id(p)], old)
        else:
            keep = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        new_masks.append((p, old, ~keep))
    totals = dict(resurrected=0, kept=0, before=0, after=0, churn=0, numel=0)
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
        resurrection_budget=plan.budget,
        n_pruned_before=totals["before"],
        n_pruned_after=totals["after"],
        numel=totals["numel"],
    )


def _keep(plan: _CommitPlan, scores: torch.Tensor, was_pruned: torch.Tensor) -> torch.Tensor:
    """The slots that stay active: the strategy's choice per row (or per matrix with scope="global")."""
    shape = scores.shape
    rows = scores.reshape(1, -1) if plan.scope == "global" else scores.reshape(-1, shape[-1])
    old = was_pruned.reshape(rows.shape)
    if plan.target_sparsity is None:
        n_keep = (~old).sum(dim=1)
    else:
        n_active = rows.shape[1] - n_to_prune(rows.shape[1], plan.target_sparsity)
        n_keep = torch.full((rows.shape[0],), n_active, device=rows.device)
    return plan.strategy.keep(rows, old, n_keep, plan.budget).view(shape)


def _scores(model, plan: _CommitPlan, params, calib, loss_fn, forward_fn) -> Optional[dict[int, torch.Tensor]]:
    """The scores ``plan`` ranks by, for every weight of ``params`` (by ``id``); None when it keeps all."""
    if plan.scoring is None:
        return None
    if plan.scoring == "magnitude":
        return {id(p): magnitude_scores(p.effective_weight()) for p in params}
    if plan.scoring == "wanda":
        norms = activation_norms(model, {id(p): p for p in params}, calib, forward_fn, caller="commit_")
        return {id(p): wanda_scores(p.effective_weight(), norms[id(p)]) for p in params}
    grads = _accumulated_grads(params, calib, loss_fn, model)
    return {id(p): gradient_scores(p.effective_weight(), grads[id(p)]) for p in params}


def _accumulated_grads(params, calib, loss_fn, model) -> dict[int, torch.Tensor]:
    """Loss gradients of ``params`` summed over ``calib`` (``.grad`` fields are not touched)."""
    sums = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}
    with torch.enable_grad():
        for batch in calib:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    sums[id(p)] += g.float()
    return sums
