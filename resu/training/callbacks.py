"""``TrainerCallback``: hooks into a RESU run. Subclass it and override what you need."""

from __future__ import annotations

from typing import Any


class TrainerCallback:
    """Called by :class:`~resu.training.cycle.RESUTrainer` (and ``DensificationTrainer``) at these points.

    Every method receives the trainer; the defaults do nothing.
    """

    def on_cycle_start(self, trainer: Any, cycle: int) -> None:
        """Before cycle ``cycle`` (0-based) starts."""

    def on_cycle_end(self, trainer: Any, stats: Any) -> None:
        """After a cycle, with its :class:`~resu.training.stats.CycleStats`."""

    def on_pause(self, trainer: Any, pause: Any) -> None:
        """When a ``DensificationTrainer`` pauses (``pause`` is the ``PauseConfig``)."""

    def on_resume(self, trainer: Any) -> None:
        """When a paused ``DensificationTrainer`` resumes."""
