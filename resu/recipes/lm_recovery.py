"""Recovering a pruned pretrained language model: plain sparse fine-tuning, and the RESU recipe.

Both take a model that :func:`resu.prune_` has already put in SPARSE mode and spend a fixed number
of optimizer steps on the same stream of token batches, so they compare at equal steps and tokens:

- :func:`finetune_`: the active weights train (:class:`resu.ResuAdamW` in SPARSE mode; pruned slots
  stay exactly zero). The baseline every recovery method has to beat.
- :func:`recover_`: a RESU (or QRESU) phase in which θ trains in the pruned slots while the active
  weights stay frozen, a commit back to the same sparsity in which resurrected slots compete with
  active ones, then sparse fine-tuning for the remaining steps.

The defaults of :class:`RecoveryRecipe` were chosen on validation perplexity of SmolLM2-135M
(``benchmarks/llm_recovery.py --variants``; BENCHMARKS.md). With them, and θ started from the weights
before pruning (``recover_(..., init_from=resu.snapshot_weights(model))`` taken before pruning), the
recipe ends below plain sparse fine-tuning at equal steps and tokens on SmolLM2 at 50%, 70% and 2:4,
3 seeds, and on a scratch-trained LM.

- θ starts from the values the pruned slots had (``init_from``): the θ phase then begins at the
  unpruned model, and what it learns is folded into the kept weights at the commit. Started from
  zero, θ first has to re-learn what pruning removed (BENCHMARKS.md: 10.81 vs 10.55 validation
  perplexity at 50%, 18.60 vs 16.85 at 70%);
- θ trains at lr 3e-4 for a quarter of the steps (``resu_fraction=0.25``): mean validation
  perplexity over 50% and 70% 13.60, just ahead of lr 1e-3 over half the steps (13.70); lr 3e-4 or
  1e-4 over half the steps (14.32, 14.46) and lr 3e-4 over three quarters (15.52) were worse. Started
  from zero (no ``init_from``), lr 1e-3 over half the steps measured best on the scratch-trained LM;
- a 10% linear warm-up keeps Adam's first steps from moving millions of slots by the full learning
  rate at once;
- the commit merges θ and re-prunes the merged weights with SparseGPT (``reprune="sparsegpt"``): its
  update folds what the dropped slots learned into the kept ones (re-pruning with Wanda measured
  11.53 vs 10.86 validation perplexity at 50%). A strategy commit (``reprune=None``) keeps only the θ that
  outscore an active weight and drops the rest of the θ phase's gain. For those commits, Wanda scores
  (magnitude scores discard the pruner's activation-aware choice and wreck an LM) and
  ``"amnesty_capped"`` (r caps resurrections rather than reserving them) measured best;
- one cycle: two cycles over the same steps measured worse (12.02 vs 10.86 at 50%).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from resu.api.commit import commit_
from resu.api.prune import prune_
from resu.api.qresu_phase import enter_qresu_
from resu.api.resu_phase import enter_resu_
from resu.api.theta_phase import snapshot_weights
from resu.optim.resu_adamw import ResuAdamW
from resu.optim.selection_config import SelectionConfig
from resu.prune.registry import PRUNE_METHODS
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepCallback = Callable[[str, int, float], None]


@dataclasses.dataclass(frozen=True)
class RecoveryRecipe:
    """The RESU recovery recipe for a pruned pretrained LM (see the module doc for why these defaults).

    Args:
        resu_fraction: share of the step budget spent in the θ phase; the rest fine-tunes after the commit.
        lr: learning rate of the sparse fine-tuning (active weights).
        theta_lr: learning rate of θ during the θ phase.
        epsilon: θ initialisation scale (θ ~ N(0, (ε·σ_A)²)); 0 starts θ at zero.
        commit_strategy: a registered commit strategy (``"amnesty_capped"``, the seed's ``"amnesty"``, ...).
        score_type: score of the merged weights at commit (``"wanda"``, ``"magnitude"``, ``"gradient"``).
        budget: r, the resurrection budget of the commit.
        weight_decay: decoupled weight decay of both phases.
        grad_clip: max gradient norm (None: no clipping).
        quantized: run the θ phase in QRESU mode (active weights frozen as packed codes) with these
            :func:`resu.enter_qresu_` keyword arguments, e.g. ``{"bits": 4, "scheme": "per_group"}``.
        warmup: share of each phase's steps over which its learning rate rises linearly from lr/k to lr
            (k = the warm-up steps); 0 starts every phase at full learning rate.
        cycles: how many θ phase → commit → fine-tune rounds share the step budget (each gets an equal
            share; the last takes the remainder).
        selective: train θ with RESU-Selective (a :class:`resu.SelectionConfig`); None trains every θ.
        reprune: commit by re-pruning instead of a commit strategy: θ is merged into every weight and
            the merged weights are pruned back to the starting sparsity with this prune method (e.g.
            ``"sparsegpt"``, whose update folds what the dropped slots did into the kept ones, so
            more of the θ phase's gain survives the commit). None uses ``commit_strategy``.
    """

    resu_fraction: float = 0.25
    lr: float = 3e-4
    theta_lr: float = 3e-4
    epsilon: float = 0.0
    commit_strategy: str = "amnesty_capped"
    score_type: str = "wanda"
    budget: float = 0.1
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    quantized: Optional[dict] = None
    warmup: float = 0.1
    cycles: int = 1
    selective: Optional[SelectionConfig] = None
    reprune: Optional[str] = "sparsegpt"

    def __post_init__(self) -> None:
        if isinstance(self.resu_fraction, bool) or not 0.0 <= float(self.resu_fraction) <= 1.0:
            raise ValueError(f"RecoveryRecipe: resu_fraction must be in [0, 1], got {self.resu_fraction!r}")
        for name in ("lr", "theta_lr", "epsilon", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"RecoveryRecipe: {name} must be a number >= 0, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"RecoveryRecipe: warmup must be a share of a phase's steps in [0, 1], got {self.warmup!r}")
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"RecoveryRecipe: cycles must be an int >= 1, got {self.cycles!r}")
        if self.reprune is not None and self.reprune not in PRUNE_METHODS:
            raise ValueError(
                f"RecoveryRecipe: reprune must be a registered prune method {PRUNE_METHODS.names()} or None, "
                f"got {self.reprune!r}"
            )
        if self.selective is not None and not isinstance(self.selective, SelectionConfig):
            raise ValueError(
                f"RecoveryRecipe: selective must be a resu.SelectionConfig or None, got {type(self.selective).__name__}"
            )


@dataclasses.dataclass
class RecoveryReport:
    """What :func:`recover_` did: losses per step, θ-phase and fine-tune step counts, and the commit."""

    losses: list[float]
    theta_steps: int
    finetune_steps: int
    n_resurrected: int
    sparsity: float


def causal_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Next-token loss of a Hugging Face causal LM on a (batch × seq) tensor of token ids (or a dict)."""
    if isinstance(batch, dict):
        return model(**batch, labels=batch["input_ids"]).loss
    return model(input_ids=batch, labels=batch).loss


def _resu_parameters(model: nn.Module) -> list[ResuParameter]:
    seen, params = set(), []
    for p in model.parameters():
        if isinstance(p, ResuParameter) and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError("no ResuParameter in `model`; call resu.sparsify_(model) and resu.prune_(model, ...) first")
    return params


def _train(model, batches: Iterator, steps: int, lr: float, recipe, loss_fn, on_step, phase: str, losses: list) -> None:
    """``steps`` ResuAdamW steps on the model's ResuParameters only (embeddings, norms, a tied head stay frozen)."""
    if steps <= 0:
        return
    params = _resu_parameters(model)
    opt = ResuAdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    # Adam's first steps move every trainable slot by about lr whatever its gradient's size; a linear
    # warm-up keeps millions of freshly started θ from jolting a pretrained model's function at once.
    warm = int(round(steps * recipe.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            loss = loss_fn(model, next(batches))
            loss.backward()
            if recipe.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(phase, len(losses), losses[-1])
    finally:
        model.train(was_training)


def _check_sparse(model: nn.Module, caller: str) -> list[ResuParameter]:
    params = _resu_parameters(model)
    modes = {p.mode for p in params}
    if modes != {ResuMode.SPARSE}:
        raise ValueError(
            f"{caller}: every ResuParameter must be in SPARSE mode (prune the model with resu.prune_ first), found "
            f"{sorted(m.name for m in modes)}"
        )
    return params


def detect_pattern(params: list[ResuParameter]) -> Optional[str]:
    """``"N:M"`` when every weight prunes exactly N of every M consecutive inputs (M = 4, then 8), else None."""
    for m in (4, 8):
        counts = set()
        for p in params:
            pruned = ~p.active_mask
            if pruned.dim() != 2 or pruned.shape[1] % m:
                return None
            counts.update(pruned.reshape(pruned.shape[0], -1, m).sum(dim=-1).unique().tolist())
            if len(counts) > 1:
                break
        if len(counts) == 1 and 0 < next(iter(counts)) < m:
            return f"{next(iter(counts))}:{m}"
    return None


def _commit(model, params, recipe: RecoveryRecipe, calib, loss_fn, pattern, sparsity: float) -> int:
    """End a θ phase at ``sparsity``; returns how many θ slots became active."""
    if recipe.reprune is None:
        extra = {"loss_fn": loss_fn} if recipe.score_type == "gradient" else {}
        stats = commit_(
            model, recipe.commit_strategy, score_type=recipe.score_type, calib=calib, r_start=recipe.budget,
            r_end=recipe.budget, **extra,
        )
        return stats.n_resurrected
    was_pruned = [(~p.active_mask).clone() for p in params]
    commit_(model, "simple")  # θ merged, every slot active
    prune_(model, sparsity, method=recipe.reprune, calib=calib, pattern=pattern)
    return sum(int((old & p.active_mask).sum()) for old, p in zip(was_pruned, params))


def finetune_(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    *,
    recipe: RecoveryRecipe = RecoveryRecipe(),
    loss_fn: LossFn = causal_lm_loss,
    on_step: Optional[StepCallback] = None,
) -> list[float]:
    """Sparse fine-tuning: ``steps`` steps of the active weights at ``recipe.lr``; returns the losses.

    ``batches`` must yield at least ``steps`` batches; pruned slots stay exactly zero throughout.
    """
    _check_sparse(model, "finetune_")
    losses: list[float] = []
    _train(model, iter(batches), steps, recipe.lr, recipe, loss_fn, on_step, "finetune", losses)
    return losses


def recover_(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    *,
    calib: Optional[Iterable[Any]] = None,
    recipe: RecoveryRecipe = RecoveryRecipe(),
    loss_fn: LossFn = causal_lm_loss,
    on_step: Optional[StepCallback] = None,
    generator: Optional[torch.Generator] = None,
    pattern: Optional[str] = None,
    init_from: Optional[Mapping[str, torch.Tensor]] = None,
) -> RecoveryReport:
    """The RESU recipe: θ phase → commit at the same sparsity → sparse fine-tuning, ``steps`` steps in all.

    With ``recipe.cycles > 1`` the budget is split into that many such rounds.

    Args:
        model: a pruned model (every ResuParameter in SPARSE mode).
        batches: training batches; at least ``steps`` of them are read, in order.
        steps: total optimizer steps (θ phase + fine-tuning), to compare with :func:`finetune_` at equal steps.
        calib: calibration batches for Wanda/gradient commit scores (required for those score types).
        recipe: the hyper-parameters (:class:`RecoveryRecipe`).
        loss_fn: ``loss_fn(model, batch) -> loss``; by default the causal-LM loss of a Hugging Face model.
        on_step: called as ``on_step(phase, step, loss)`` after every optimizer step.
        generator: random generator for θ's initialisation (unused when ``recipe.epsilon == 0``).
        pattern: the model's N:M pattern (e.g. ``"2:4"``), which a ``recipe.reprune`` commit keeps; None
            detects a 2:4-style pattern (N of every 4 or 8 consecutive inputs) from the masks.
        init_from: the weights before pruning (:func:`resu.snapshot_weights`, taken before
            :func:`resu.prune_`). θ then starts from the values the pruned slots had, so the θ phase
            begins at the unpruned model; in later cycles it starts from the values the commit dropped.
            None starts θ as ``recipe.epsilon`` says. Meant for pruners that leave the kept weights as
            they were (magnitude, Wanda): after SparseGPT, whose update changes the kept weights, the θ
            phase does not start at the unpruned model (on SmolLM2 at 50% it then ended at validation
            perplexity 11.23, against 10.55 from Wanda's model; BENCHMARKS.md).

    Returns:
        A :class:`RecoveryReport`; the model ends in SPARSE mode at its starting sparsity.
    """
    params = _check_sparse(model, "recover_")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"recover_: steps must be an int >= 0, got {steps!r}")
    if recipe.score_type in ("wanda", "gradient") and calib is None:
        raise ValueError(f"recover_: score_type={recipe.score_type!r} needs calibration batches; pass calib=...")
    calib = list(calib) if calib is not None else None
    if recipe.reprune is not None and PRUNE_METHODS.get(recipe.reprune, "recover_", "recipe.reprune").statistic and calib is None:
        raise ValueError(f"recover_: reprune={recipe.reprune!r} needs calibration batches; pass calib=...")
    numel = sum(p.numel() for p in params)
    sparsity = sum(p.n_pruned for p in params) / numel if numel else 0.0
    if pattern is None and recipe.reprune is not None:
        pattern = detect_pattern(params)
    batches = iter(batches)
    losses: list[float] = []
    theta_total = finetune_total = resurrected = 0
    for cycle in range(recipe.cycles):
        share = steps // recipe.cycles + (steps % recipe.cycles if cycle == recipe.cycles - 1 else 0)
        theta_steps = int(round(share * recipe.resu_fraction))
        start = dict(epsilon=recipe.epsilon, generator=generator, selective=recipe.selective, init_from=init_from)
        if recipe.quantized is not None:
            enter_qresu_(model, **start, **recipe.quantized)
        else:
            enter_resu_(model, **start)
        _train(model, batches, theta_steps, recipe.theta_lr, recipe, loss_fn, on_step, "theta", losses)
        if init_from is not None and cycle + 1 < recipe.cycles:
            # the next θ phase restarts each pruned slot from the value it had when this commit pruned it
            init_from = snapshot_weights(model)
        resurrected += _commit(model, params, recipe, calib, loss_fn, pattern, sparsity)
        _train(model, batches, share - theta_steps, recipe.lr, recipe, loss_fn, on_step, "finetune", losses)
        theta_total += theta_steps
        finetune_total += share - theta_steps
    return RecoveryReport(
        losses=losses,
        theta_steps=theta_total,
        finetune_steps=finetune_total,
        n_resurrected=resurrected,
        sparsity=sum(p.n_pruned for p in params) / numel if numel else 0.0,
    )
