"""``RESUTrainer``: many RESU cycles, with evaluation, callbacks, a summary and resumable state."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from resu.training.callbacks import TrainerCallback
from resu.training.checkpoint import STATE_VERSION, check_trainer_state, restored_on_error
from resu.training.config import RESUConfig
from resu.training.one_cycle import RESUCycle
from resu.training.setup import EvalFn, TrainFn, TrainingSetup
from resu.training.stats import CycleStats
from resu.training.stream import BatchStream

logger = logging.getLogger("resu.training")


class RESUTrainer(TrainingSetup):
    """Runs RESU cycles (:class:`~resu.training.one_cycle.RESUCycle`) over a training loader.

    Args:
        model: the model; a plain one is sparsified on the way in (:func:`resu.sparsify_`; the
            parameter objects are kept, so ``optimizer`` may be built before).
        config: a :class:`~resu.training.config.RESUConfig`.
        optimizer: the user's optimizer for the TRAIN phases (any ``torch.optim.Optimizer``;
            :class:`resu.ResuAdamW` keeps the fewest states). It is set aside during RESU phases.
        train_fn: ``train_fn(model, batch) -> loss``.
        eval_fn: optional ``eval_fn(model) -> dict`` run after every cycle (``CycleStats.eval_metrics``).
        pruner: optional custom pruner (``.prune(sparsity)`` or ``pruner(model, sparsity)``).
        stabilizer: optional custom stabilizer replacing DSNoT (``.stabilize(calib)`` or
            ``stabilizer(model, calib)``).
        callbacks: :class:`~resu.training.callbacks.TrainerCallback` objects.

    Batches are drawn from the loader endlessly (a new pass starts when one ends), and the position
    is part of :meth:`state_dict`: a run saved after some cycles and resumed with
    :meth:`load_state_dict` (same loader, fresh model and optimizer) ends bitwise equal to an
    uninterrupted run on CPU.
    """

    def __init__(
        self, model: nn.Module, config: RESUConfig, optimizer: torch.optim.Optimizer, train_fn: TrainFn,
        eval_fn: Optional[EvalFn] = None,
        pruner: Any = None,
        stabilizer: Any = None,
        *,
        callbacks: Optional[Sequence[TrainerCallback]] = None,
    ):
        super().__init__(model, config, optimizer, train_fn, eval_fn, pruner, stabilizer)
        self.callbacks = list(callbacks or [])
        self.cycle = 0
        self.stats: list[CycleStats] = []
        self.generator = torch.Generator().manual_seed(config.seed)
        self._stream: Optional[BatchStream] = None
        self._pending_stream_state: Optional[dict] = None

    # ------------------------------------------------------------------ running
    def _stream_for(self, loader: Iterable[Any]) -> BatchStream:
        if self._stream is None or self._stream.loader is not loader:
            if self._stream is not None and self._stream.pending:  # a resume that never reached its batch
                self._pending_stream_state = self._stream.state_dict()
            self._stream = BatchStream(loader)
            if self._pending_stream_state is not None:
                self._stream.load_state_dict(self._pending_stream_state)
                self._pending_stream_state = None
        return self._stream

    def _cycles_to_run(self, num_cycles: Optional[int]) -> int:
        if num_cycles is None:
            return max(0, self.config.num_cycles - self.cycle)
        if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 0:
            raise ValueError(f"train: `num_cycles` must be an integer >= 0 (or None), got {num_cycles!r}")
        return num_cycles

    def run_cycle(self, train_loader: Iterable[Any]) -> CycleStats:
        """Run the next cycle and return its stats."""
        stream = self._stream_for(train_loader)
        for cb in self.callbacks:
            cb.on_cycle_start(self, self.cycle)
        cycle = RESUCycle(
            self.model,
            self.config,
            self.optimizer,
            self.train_fn,
            self.cycle,
            eval_fn=self.eval_fn,
            pruner=self.pruner,
            stabilizer=self.stabilizer,
            generator=self.generator,
        )
        stats = cycle.run(stream)
        self.stats.append(stats)
        self.cycle += 1
        for cb in self.callbacks:
            cb.on_cycle_end(self, stats)
        return stats

    def train(self, train_loader: Iterable[Any], num_cycles: Optional[int] = None) -> list[CycleStats]:
        """Run ``num_cycles`` cycles (default: those of ``config.num_cycles`` not run yet).

        Returns the :class:`CycleStats` of the cycles run by this call (all of them are in ``.stats``).
        Cycles past ``config.num_cycles`` repeat the last cycle's sparsity and resurrection budget.
        """
        n = self._cycles_to_run(num_cycles)
        return [self.run_cycle(train_loader) for _ in range(n)]

    # ------------------------------------------------------------------ reporting
    def get_training_summary(self) -> dict[str, Any]:
        """Totals and final values over the cycles run so far."""
        stats = self.stats
        last = stats[-1] if stats else None
        rates = [s.resurrection_rate for s in stats]
        return {
            "num_cycles": len(stats),
            "final_sparsity": last.actual_sparsity if last else 0.0,
            "target_sparsity": last.target_sparsity if last else self.config.sparsity_at(0),
            "total_resurrected": sum(s.n_resurrected for s in stats),
            "total_train_steps": sum(s.train_steps for s in stats),
            "total_resu_steps": sum(s.resu_steps for s in stats),
            "total_resu_updates": sum(s.resu_updates for s in stats),
            "mean_resurrection_rate": sum(rates) / len(rates) if rates else 0.0,
            "final_train_loss": last.train_loss if last else math.nan,
            "final_eval": dict(last.eval_metrics) if last else {},
            "total_duration_seconds": sum(s.duration_seconds for s in stats),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume after the last finished cycle: model, optimizer, stats, RNG
        states and the loader position. Save it with ``torch.save``."""
        stream_state = self._stream.state_dict() if self._stream is not None else self._pending_stream_state
        return {
            "version": STATE_VERSION,
            "cycle": self.cycle,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stats": [s.to_dict() for s in self.stats],
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "stream": stream_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`train` continues where that run stopped.

        All or nothing: every part is validated first (:func:`resu.training.checkpoint.check_trainer_state`),
        and if loading the model or the optimizer still fails, both are put back and the trainer stays
        where it was. Raises a ValueError naming the bad field.
        """
        stats = check_trainer_state(state, self.model, self.optimizer)
        if state["config"] != self.config.to_dict():
            warnings.warn(
                "RESUTrainer.load_state_dict: the saved config differs from this trainer's; continuing with this one",
                stacklevel=2,
            )
        with restored_on_error(self.model, self.optimizer):
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.stats = stats
        self.cycle = int(state["cycle"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._stream = None
        self._pending_stream_state = state["stream"]
