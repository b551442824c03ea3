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
def accumulate_linear_inputs(
    model: nn.Module,
    params: dict[int, torch.Tensor],
    calib: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]],
    statistic: Callable[[torch.Tensor], torch.Tensor],
    caller: str,
) -> dict[int, torch.Tensor]:
    """Sum of ``statistic(x)`` over the calibration inputs ``x`` (2-D fp32: tokens × features) of every
    Linear layer whose weight is in ``params`` (keyed by ``id``).

    A weight used by several Linear modules accumulates the inputs of all of them. The model runs in
    eval mode for the calibration pass and gets its training flags back after. Raises a ValueError
    (prefixed by ``caller``) when ``calib`` is empty or a weight saw no input.
    """
    forward_fn = forward_fn or default_forward
    totals: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(pid: int):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            value = statistic(x.reshape(-1, x.shape[-1]).float())
            totals[pid] = totals[pid] + value if pid in totals else value

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
        raise ValueError(f"{caller}: `calib` yielded no batches; pass at least one calibration batch")
    missing = [pid for pid in params if pid not in totals]
    if missing:
        raise ValueError(
            f"{caller}: {len(missing)} sparsified weight(s) saw no input during calibration; make sure the "
            "calibration batches run every sparsified Linear layer"
        )
    return totals


def activation_norms(
    model: nn.Module,
    params: dict[int, torch.Tensor],
    calib: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    caller: str = "prune_",
) -> dict[int, torch.Tensor]:
    """L2 norm of every input feature of the Linear layers whose weight is in ``params`` (keyed by ``id``),
    over the ``calib`` batches (see :func:`accumulate_linear_inputs`)."""
    sumsq = accumulate_linear_inputs(model, params, calib, forward_fn, lambda x: x.pow(2).sum(0), caller)
    return {pid: s.sqrt() for pid, s in sumsq.items()}
