"""Statistics of the inputs of Linear layers over calibration batches, for the calibrated prune methods.

A prune method declares the statistic it needs (see :data:`resu.prune.registry.STATISTICS`):
``"input_sqnorm"`` (Σ x_j² per input feature, Wanda) or ``"gram"`` (Σ x xᵀ, SparseGPT, DSNoT);
:func:`linear_input_statistics` computes it for every weight in one calibration pass.
"""

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
    (prefixed by ``caller``) when ``calib`` is empty, a weight saw no input, or a layer's inputs held
    NaN or infinite values (a mask chosen from them would be arbitrary).
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

    layer_names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in params:
            layer_names.setdefault(id(module.weight), name)
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
    # Once per weight, after the pass: a non-finite input leaves a non-finite sum (squares and
    # products of inf/NaN stay non-finite), so one check per total catches every batch.
    for pid, total in totals.items():
        if not bool(torch.isfinite(total).all()):
            raise ValueError(
                f"{caller}: the calibration inputs of layer `{layer_names[pid]}` hold NaN or infinite values; "
                "a mask chosen from them would be arbitrary. Check the calibration batches (and the layers before it)"
            )
    return totals


_STATISTIC_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "input_sqnorm": lambda x: x.pow(2).sum(0),
    "gram": lambda x: x.t() @ x,
}


def linear_input_statistics(
    model: nn.Module,
    params: dict[int, torch.Tensor],
    statistic: str,
    calib: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    caller: str = "prune_",
) -> dict[int, torch.Tensor]:
    """The calibration ``statistic`` (a name of :data:`resu.prune.registry.STATISTICS`) of every weight in
    ``params`` (keyed by ``id``): ``"input_sqnorm"`` gives Σ x_j² per input feature (shape ``(in,)``),
    ``"gram"`` gives Σ x xᵀ (shape ``(in, in)``), both fp32, over all the ``calib`` batches."""
    return accumulate_linear_inputs(model, params, calib, forward_fn, _STATISTIC_FNS[statistic], caller)


def activation_norms(
    model: nn.Module,
    params: dict[int, torch.Tensor],
    calib: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    caller: str = "prune_",
) -> dict[int, torch.Tensor]:
    """L2 norm of every input feature of the Linear layers whose weight is in ``params`` (keyed by ``id``),
    over the ``calib`` batches (see :func:`accumulate_linear_inputs`)."""
    sumsq = linear_input_statistics(model, params, "input_sqnorm", calib, forward_fn, caller)
    return {pid: s.sqrt() for pid, s in sumsq.items()}
