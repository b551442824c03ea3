"""Input-activation norms of Linear layers over calibration batches, for Wanda."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch: a tensor as ``model(t)``, a dict as ``model(**d)``, a tuple/list
    (the usual ``(inputs, targets)``) as ``model(batch[0])``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    raise TypeError(
        f"calibration batch of type {type(batch).__name__} is not understood; pass forward_fn=(model, batch) -> output"
    )


@torch.no_grad()
def activation_norms(
    model: nn.Module,
    params: dict[int, torch.Tensor],
    calib: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> dict[int, torch.Tensor]:
    """L2 norm of every input feature of the Linear layers whose weight is in ``params`` (keyed by ``id``).

    A weight used by several Linear modules accumulates the inputs of all of them. The model runs in
    eval mode for the calibration pass and gets its training flags back after.
    """
    forward_fn = forward_fn or default_forward
    sumsq: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(pid: int):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            s = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
            sumsq[pid] = sumsq[pid] + s if pid in sumsq else s

        return hook

    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in params:
            handles.append(module.register_forward_hook(make_hook(id(module.weight))))
    training = {m: m.training for m in model.modules()}
    model.eval()
    n_batches = 0
    try:
        for batch in calib:
            forward_fn(model, batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    if n_batches == 0:
        raise ValueError("prune_: `calib` yielded no batches; Wanda needs at least one calibration batch")
    missing = [pid for pid in params if pid not in sumsq]
    if missing:
        raise ValueError(
            f"prune_: {len(missing)} sparsified weight(s) saw no input during calibration; make sure the "
            "calibration batches run every sparsified Linear layer"
        )
    return {pid: s.sqrt() for pid, s in sumsq.items()}
