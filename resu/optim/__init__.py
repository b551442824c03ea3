"""Optimizers for ResuParameters."""

from resu.optim.resu_adamw import ResuAdamW

__all__ = ["ResuAdamW"]
