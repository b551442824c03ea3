"""Optimizers for ResuParameters."""

from resu.optim.resu_adamw import ResuAdamW
from resu.optim.step_in_backward import StepInBackward

__all__ = ["ResuAdamW", "StepInBackward"]
