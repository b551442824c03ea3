"""Calibration statistics of a Linear layer's inputs, accumulated by forward hooks.

For the inputs x (tokens × in) a layer sees during calibration:
  - ``"input_sqnorm"``: Σ x_j² per input feature, shape (in,) (Wanda's ‖X_j‖² before the square root);
  - ``"gram"``: Σ x xᵀ, shape (in, in) (SparseGPT's Hessian, up to the factor 2).
Both accumulate in float32 whatever the model's dtype, so a bf16 model calibrates like an fp32 one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from resu.prune.registry import STATISTICS


def statistic_of(name: str, x: torch.Tensor) -> torch.Tensor:
    """The statistic ``name`` of one batch of inputs ``x`` (…, in), in float32."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    if name == "input_sqnorm":
        return x.pow(2).sum(0)
    if name == "gram":
        return x.T @ x
    raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")


class InputStatistic:
    """Accumulates statistic ``name`` over the inputs of the given Linear modules (which share one weight).

    Use as a context manager: hooks are registered on entry and removed on exit; :attr:`value` is the
    running sum (None until an input was seen) and :attr:`tokens` the number of input rows seen.
    """

    def __init__(self, name: str, modules: list[nn.Module]):
        if name not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")
        self.name = name
        self.modules = modules
        self.value: Optional[torch.Tensor] = None
        self.tokens = 0
        self._handles: list = []

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0]
        stat = statistic_of(self.name, x)
        self.value = stat if self.value is None else self.value.add_(stat)
        self.tokens += x.numel() // x.shape[-1]

    def __enter__(self) -> "InputStatistic":
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
