"""Seed 000's home of the cycle classes: :class:`RESUCycle` (one cycle, :mod:`resu.training.one_cycle`)
and :class:`RESUTrainer` (many cycles, :mod:`resu.training.trainer`), importable from here."""

from resu.training.one_cycle import RESUCycle
from resu.training.trainer import RESUTrainer

__all__ = ["RESUCycle", "RESUTrainer"]
