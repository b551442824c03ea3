"""Finding the ResuParameters of a model, each once (tied weights are shared objects)."""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from resu.tensors.resu_parameter import ResuParameter


def resu_parameters(model: nn.Module) -> Iterator[tuple[str, ResuParameter]]:
    """Yield ``(qualified_name, parameter)`` for every ResuParameter of ``model``, tied ones once."""
    for name, p in model.named_parameters():  # named_parameters already de-duplicates shared objects
        if isinstance(p, ResuParameter):
            yield name, p


def require_resu_parameters(model: nn.Module, caller: str) -> list[tuple[str, ResuParameter]]:
    """All ResuParameters of ``model``, or a ValueError telling the user to call ``sparsify_`` first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: `model` must be an nn.Module, got {type(model).__name__}")
    found = list(resu_parameters(model))
    if not found:
        raise ValueError(
            f"{caller}: `model` has no ResuParameter weights; call resu.sparsify_(model) first"
        )
    return found
