"""``RESUCycle``: one TRAIN → PRUNE → STABILIZE → RESU → COMMIT cycle.

(``RESUTrainer``, which runs many cycles, lives in :mod:`resu.training.trainer`; seed 000 imports
both from :mod:`resu.training.cycle`.)
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

import resu
from resu.api.params import resu_parameters
from resu.tensors.mode import ResuMode
from resu.training.config import RESUConfig
from resu.training.optimizer_states import reset_changed_slots_
from resu.training.phases import commit_phase, model_sparsity, prune_phase, pruned_masks, stabilize_phase
from resu.training.progress import phase_bar
from resu.training.setup import EvalFn, TrainFn, TrainingSetup
from resu.training.stats import CycleStats
from resu.training.stream import BatchStream
from resu.training.theta_phase import run_theta_phase

logger = logging.getLogger("resu.training")


def evaluate(eval_fn: Optional[EvalFn], model: nn.Module) -> dict:
    """``eval_fn(model)`` as a dict of floats (a bare number becomes ``{"metric": x}``)."""
    if eval_fn is None:
        return {}
    result = eval_fn(model)
    if result is None:
        return {}
    if isinstance(result, dict):
        return {str(k): float(v) for k, v in result.items()}
    return {"metric": float(result)}


class RESUCycle(TrainingSetup):
    """One RESU cycle on ``model``:

    1. **TRAIN** — ``train_steps`` steps with the user's optimizer and the current mask;
    2. **PRUNE** — to the cycle's target sparsity (``config.pruning_method`` or a custom ``pruner``),
       only when the model is not that sparse yet;
    3. **STABILIZE** — after a prune: DSNoT mask refinement (:func:`resu.stabilize_`) or a custom
       ``stabilizer``;
    4. **RESU** — θ in the pruned slots, trained with a fresh :class:`resu.ResuAdamW` (``resu_lr``);
    5. **COMMIT** — :func:`resu.commit_` with ``config.commit_strategy``; the user's optimizer takes
       over again (its per-slot states are zeroed where the mask changed).

    A plain model is sparsified first (:func:`resu.sparsify_`); in cycle 0 a DENSE model is pruned
    to ``initial_sparsity`` (magnitude) before training when that is above 0.

    ``train_fn(model, batch)`` returns the loss; the cycle does ``zero_grad``/``backward``/``step``.
    It also runs calibration forwards (Wanda, DSNoT) through ``train_fn`` under ``no_grad``.
    """

    def __init__(
        self, model: nn.Module, config: RESUConfig, optimizer: torch.optim.Optimizer, train_fn: TrainFn,
        cycle_num: int = 0,
        *,
        eval_fn: Optional[EvalFn] = None,
        pruner: Any = None,
        stabilizer: Any = None,
        generator: Optional[torch.Generator] = None,
    ):
        if isinstance(cycle_num, bool) or not isinstance(cycle_num, int) or cycle_num < 0:
            raise ValueError(f"RESUCycle: `cycle_num` must be an integer >= 0, got {cycle_num!r}")
        super().__init__(model, config, optimizer, train_fn, eval_fn, pruner, stabilizer)
        self.cycle_num = cycle_num
        self.generator = generator if generator is not None else torch.Generator().manual_seed(config.seed + cycle_num)

    # ------------------------------------------------------------------ helpers
    def _calibration_forward(self, model: nn.Module, batch: Any) -> Any:
        return self.train_fn(model, batch)

    def _initial_prune(self) -> None:
        cfg = self.config
        if self.cycle_num != 0 or cfg.initial_sparsity <= 0:
            return
        if all(p.mode is ResuMode.DENSE for _, p in resu_parameters(self.model)):
            resu.prune_(self.model, cfg.initial_sparsity, method="magnitude", scope=cfg.pruning_scope)
            logger.info("pruned the dense model to initial_sparsity=%.3f (magnitude)", cfg.initial_sparsity)

    def _train_phase(self, stream: BatchStream, steps: int, recent: deque) -> float:
        model, opt = self.model, self.optimizer
        model.train()
        loss_sum = None
        with phase_bar(steps, f"cycle {self.cycle_num} TRAIN", self.config.progress_bar) as bar:
            for _ in range(steps):
                batch = stream.next()
                recent.append(batch)
                loss = self.train_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_loss = loss.detach().double()
                loss_sum = step_loss if loss_sum is None else loss_sum + step_loss
                bar.update(1)
        opt.zero_grad(set_to_none=True)
        return float(loss_sum) / steps if loss_sum is not None else math.nan

    # ------------------------------------------------------------------ the cycle
    def run(self, train_loader: Union[Iterable[Any], BatchStream]) -> CycleStats:
        """Run the five phases on batches from ``train_loader`` and return the :class:`CycleStats`."""
        cfg = self.config
        stream = train_loader if isinstance(train_loader, BatchStream) else BatchStream(train_loader)
        start = time.perf_counter()
        train_steps, stabilize_rounds, resu_steps = cfg.phase_steps()
        target = cfg.sparsity_at(self.cycle_num)
        self._initial_prune()

        recent: deque = deque(maxlen=cfg.calib_batches)
        train_loss = self._train_phase(stream, train_steps, recent)
        masks_before = pruned_masks(self.model)
        calib_cache: list = []

        def calib() -> list:
            # The last TRAIN batches of this cycle, topped up from the stream when TRAIN was short.
            if not calib_cache:
                calib_cache.extend(recent)
                calib_cache.extend(stream.take(cfg.calib_batches - len(calib_cache)))
            return calib_cache

        forward = self._calibration_forward
        pruned, reference = prune_phase(self.model, cfg, target, calib, forward, self.pruner, self.generator)
        swaps = stabilize_phase(self.model, cfg, stabilize_rounds, calib, forward, reference, self.stabilizer) if pruned else 0
        logger.debug("cycle %d: pruned=%s, %d DSNoT swaps", self.cycle_num, pruned, swaps)

        commit_stats = None
        theta = None
        if resu_steps > 0:
            with phase_bar(resu_steps, f"cycle {self.cycle_num} RESU", cfg.progress_bar) as bar:
                theta = run_theta_phase(self.model, cfg, stream, resu_steps, self.train_fn, self.generator, bar)
            commit_stats = commit_phase(
                self.model, cfg, self.cycle_num, target, calib, self.train_fn, forward, theta.was_pruned
            )
        masks_after = pruned_masks(self.model)
        reset_changed_slots_(self.optimizer, {k: masks_before[k] ^ masks_after[k] for k in masks_after if k in masks_before})
        metrics = evaluate(self.eval_fn, self.model)
        stats = CycleStats(
            cycle=self.cycle_num,
            target_sparsity=target,
            actual_sparsity=model_sparsity(self.model),
            train_loss=train_loss,
            train_steps=train_steps,
            resu_steps=resu_steps,
            resu_updates=theta.n_updates if theta else 0,
            mean_consistency=theta.mean_consistency if theta else math.nan,
            mean_selection_ratio=theta.mean_selection_ratio if theta else math.nan,
            resurrection_budget=commit_stats.resurrection_budget if commit_stats else 0.0,
            n_resurrected=commit_stats.n_resurrected if commit_stats else 0,
            n_active_kept=commit_stats.n_active_kept if commit_stats else 0,
            resurrection_rate=commit_stats.resurrection_rate if commit_stats else 0.0,
            duration_seconds=time.perf_counter() - start,
            resu_loss=theta.mean_loss if theta else math.nan,
            mask_churn=commit_stats.mask_churn if commit_stats else 0.0,
            stabilize_swaps=swaps,
            pruned=pruned,
            eval_metrics=metrics,
        )
        logger.info(
            "cycle %d: sparsity %.3f (target %.3f), train loss %.4f, RESU loss %.4f, %d resurrected (r=%.3f)%s",
            stats.cycle, stats.actual_sparsity, stats.target_sparsity, stats.train_loss, stats.resu_loss,
            stats.n_resurrected, stats.resurrection_budget,
            "".join(f", {k} {v:.4f}" for k, v in metrics.items()),
        )
        return stats

