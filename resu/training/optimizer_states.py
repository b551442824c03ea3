"""Keeping a user's optimizer consistent after a mask change."""

from __future__ import annotations

import torch

from resu.optim.resu_adamw import ResuAdamW


@torch.no_grad()
def reset_changed_slots_(optimizer: torch.optim.Optimizer, changed: dict[int, torch.Tensor]) -> None:
    """Zero the per-slot states of ``optimizer`` at slots whose pruned/active status changed.

    ``changed`` maps ``id(parameter)`` to a bool tensor of its shape. A revived slot then starts
    with fresh moments instead of stale ones from when it was last active. :class:`resu.ResuAdamW`
    needs nothing: it restarts a weight's states itself whenever its layout changes.
    """
    if isinstance(optimizer, ResuAdamW):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            mask = changed.get(id(p))
            if mask is None or not bool(mask.any()):
                continue
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value[mask.to(value.device)] = 0
