"""Gradient hooks that let a ``RESULinear`` weight train θ with stock ``torch.optim`` optimizers.

The core gives a RESU/QRESU weight a compact gradient (:class:`~resu.tensors.compact_grad.CompactGrad`,
θ values only), which only :class:`resu.ResuAdamW` understands. ``RESULinear`` registers one of these
hooks on entering a phase and removes them on exit:

- :func:`densify_theta_grad` (RESU): the gradient becomes an ordinary dense tensor, exactly zero at
  the active slots, so ``torch.optim.Adam([layer.weight])`` can step it.
- :func:`share_grad_with_theta` and :func:`drop_stale_weight_grad` (QRESU): ``weight._theta.grad`` is
  the θ gradient (the CompactGrad's values), so ``torch.optim.Adam([layer._theta])`` trains θ.
- :func:`selective_step_hook` (QRESU-Selective): a ResuAdamW owned by the layer steps θ as soon as the
  gradient has arrived.

The hooks hold no reference to the layer.
"""

from __future__ import annotations

from typing import Callable

import torch

from resu.tensors.compact_grad import CompactGrad
from resu.tensors.layout import WritePolicy
from resu.tensors.mode import ResuMode


@torch.no_grad()
def densify_theta_grad(param) -> None:
    """RESU weight opted in to stock optimizers: replace a CompactGrad by its dense form.

    Runs after the core's own hook (which turns any dense gradient into a CompactGrad, dropping its
    active part), so the result is always exactly zero at the active slots.
    """
    grad = param.grad
    if isinstance(grad, CompactGrad) and param.mode is ResuMode.RESU and param.resu_layout.write_policy is WritePolicy.RESTORE_ACTIVE:
        param.grad = grad.to_dense()


@torch.no_grad()
def share_grad_with_theta(param) -> None:
    """QRESU weight (post-accumulate): ``param._theta.grad`` becomes the weight's θ gradient values.

    The CompactGrad's ``values`` are θ's gradient in θ's own order, so they are handed over without a
    copy (same storage): gradient accumulation over several backwards shows in both, and
    ``resu.ResuAdamW([layer.weight])`` still sees ``weight.grad``.
    """
    grad = param.grad
    if grad is None or param.mode is not ResuMode.QRESU:
        return
    param._theta.grad = grad.values if isinstance(grad, CompactGrad) else param._gather_pruned(grad)


def drop_stale_weight_grad(param) -> Callable:
    """QRESU weight (tensor pre-hook, before accumulation): an optimizer over ``_theta`` clears
    ``_theta.grad`` only; when it is None, the weight's old gradient is stale and is dropped, so the
    new backward starts from zero instead of adding to the previous step's gradient."""

    def hook(new_grad):
        if param.mode is ResuMode.QRESU and param._theta.grad is None and param.grad is not None:
            param.grad = None

    return hook


def selective_step_hook(optimizer: torch.optim.Optimizer) -> Callable:
    """A hook that steps ``optimizer`` (the layer's selective ResuAdamW) and then clears the gradient."""

    def step_theta(param) -> None:
        if param.grad is None or param.mode is not ResuMode.QRESU:
            return
        optimizer.step()
        param.grad = None

    return step_theta
