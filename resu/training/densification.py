"""Densification (sparsity going down over the cycles) and pause points for interleaved RL training.

The schedules themselves are :class:`~resu.training.config.DensificationSchedule` (``STEPPED`` or
``LINEAR``) selected in the config with ``densify=True``; :func:`densification_targets` lists the
per-cycle targets. :class:`DensificationTrainer` runs the cycles as a generator that can pause after
given cycles, so other training (reinforcement learning, say) can run on the model in between.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from resu.training.callbacks import TrainerCallback
from resu.training.config import DensificationSchedule, RESUConfig
from resu.training.stats import CycleStats
from resu.training.trainer import RESUTrainer

__all__ = [
    "DensificationSchedule",
    "DensificationTrainer",
    "PauseConfig",
    "PauseReason",
    "densification_targets",
]


def densification_targets(config: RESUConfig) -> list[float]:
    """The target sparsity of every cycle of ``config`` (any schedule, densifying or not)."""
    return [config.sparsity_at(c) for c in range(config.num_cycles)]


class PauseReason(str, enum.Enum):
    """Why a :class:`DensificationTrainer` pauses."""

    RL_TRAINING = "rl_training"
    EVALUATION = "evaluation"
    CHECKPOINT = "checkpoint"
    CUSTOM = "custom"


@dataclass
class PauseConfig:
    """Pause after cycle ``after_cycle`` (0-based) for ``reason``; ``duration_steps`` is informational
    (how long the outside training is meant to run), ``metadata`` is free-form."""

    after_cycle: int
    reason: PauseReason = PauseReason.RL_TRAINING
    duration_steps: int = 0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.after_cycle, bool) or not isinstance(self.after_cycle, int) or self.after_cycle < 0:
            raise ValueError(f"PauseConfig: `after_cycle` must be an integer >= 0, got {self.after_cycle!r}")
        if isinstance(self.duration_steps, bool) or not isinstance(self.duration_steps, int) or self.duration_steps < 0:
            raise ValueError(f"PauseConfig: `duration_steps` must be an integer >= 0, got {self.duration_steps!r}")
        try:
            self.reason = PauseReason(self.reason)
        except ValueError:
            options = ", ".join(r.value for r in PauseReason)
            raise ValueError(f"PauseConfig: unknown `reason` {self.reason!r}; expected a PauseReason ({options})") from None


class DensificationTrainer(RESUTrainer):
    """A :class:`RESUTrainer` whose cycles can pause for outside training.

    ``train_with_pauses(loader)`` yields the :class:`CycleStats` of every cycle. After a cycle named
    by a :class:`PauseConfig`, :attr:`is_paused` is True when its stats are yielded: do the outside
    training, then call :meth:`resume` before asking for the next cycle (asking without resuming
    raises a RuntimeError). Callbacks get ``on_pause``/``on_resume``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RESUConfig,
        optimizer: torch.optim.Optimizer,
        train_fn,
        eval_fn=None,
        pruner: Any = None,
        stabilizer: Any = None,
        *,
        pause_configs: Sequence[PauseConfig] = (),
        callbacks: Optional[Sequence[TrainerCallback]] = None,
    ):
        super().__init__(model, config, optimizer, train_fn, eval_fn, pruner, stabilizer, callbacks=callbacks)
        pauses: dict[int, PauseConfig] = {}
        for pause in pause_configs:
            if not isinstance(pause, PauseConfig):
                raise TypeError(f"`pause_configs` must hold PauseConfig objects, got {type(pause).__name__}")
            if pause.after_cycle in pauses:
                raise ValueError(f"`pause_configs`: two pauses after cycle {pause.after_cycle}; keep one")
            pauses[pause.after_cycle] = pause
        self.pause_configs = pauses
        self._paused: Optional[PauseConfig] = None

    @property
    def is_paused(self) -> bool:
        """True between a pausing cycle's yield and :meth:`resume`."""
        return self._paused is not None

    @property
    def current_pause(self) -> Optional[PauseConfig]:
        """The active :class:`PauseConfig`, or None."""
        return self._paused

    def resume(self) -> None:
        """Continue after a pause."""
        if self._paused is None:
            raise RuntimeError("DensificationTrainer.resume: the trainer is not paused")
        self._paused = None
        for cb in self.callbacks:
            cb.on_resume(self)

    def train_with_pauses(self, train_loader: Iterable[Any], num_cycles: Optional[int] = None) -> Iterator[CycleStats]:
        """Yield the stats of each cycle (default: the cycles of ``config.num_cycles`` not run yet)."""
        for _ in range(self._cycles_to_run(num_cycles)):
            if self._paused is not None:
                raise RuntimeError(
                    f"DensificationTrainer: paused after cycle {self._paused.after_cycle} "
                    f"({self._paused.reason.value}); call trainer.resume() before the next cycle"
                )
            stats = self.run_cycle(train_loader)
            pause = self.pause_configs.get(stats.cycle)
            if pause is not None:
                self._paused = pause
                for cb in self.callbacks:
                    cb.on_pause(self, pause)
            yield stats
