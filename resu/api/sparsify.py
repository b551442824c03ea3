"""``sparsify_`` and ``densify_``: converting a model's Linear weights to and from ResuParameters."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch.nn as nn

from resu.tensors.resu_parameter import ResuParameter

FilterFn = Callable[[str, nn.Module], bool]


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """For every parameter object: the (module, attribute, qualified module name) places holding it."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr, mod_name))
    return owners


def sparsify_(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Turn the weight of every ``nn.Linear`` in ``model`` into a DENSE :class:`ResuParameter`, in place.

    Modules keep their type (``type(model.fc)`` is still ``nn.Linear``); only ``module.weight``
    changes type, and it stays an ``nn.Parameter`` with the same values, storage and ``requires_grad``.
    A weight shared by several Linear modules is converted once and stays shared. A weight that a
    non-Linear module also uses (a language-model head tied to its embedding, say) is left as it is,
    with a warning, since the other module's op would give it a dense gradient.

    Args:
        model: the model to convert.
        filter_fn: optional ``filter_fn(qualified_name, module) -> bool``; only Linear modules for
            which it returns True are converted.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if a selected weight is already a ResuParameter (``sparsify_`` called twice) or is
            not floating-point. Nothing is converted in that case.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify_: `model` must be an nn.Module, got {type(model).__name__}")
    owners = _owners(model)
    plan: dict[int, nn.Parameter] = {}
    skipped_tied: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight is None:
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        w = module.weight
        if isinstance(w, ResuParameter):
            raise ValueError(
                f"sparsify_: `{name}.weight` is already a ResuParameter; sparsify_ was called twice on this "
                "model. Use the model as it is, or resu.densify_(model) first."
            )
        if not w.is_floating_point():
            raise ValueError(
                f"sparsify_: `{name}.weight` has dtype {w.dtype}; only floating-point weights can be "
                "sparsified. Exclude this module with filter_fn."
            )
        if any(not isinstance(m, nn.Linear) or attr != "weight" for m, attr, _ in owners[id(w)]):
            skipped_tied.append(name)
            continue
        plan[id(w)] = w
    if skipped_tied:
        warnings.warn(
            "sparsify_: left these Linear weights dense because a non-Linear module shares them "
            f"(tied weights): {', '.join(skipped_tied)}",
            stacklevel=2,
        )
    for pid, w in plan.items():
        new = nn.Parameter(ResuParameter.from_weight(w.data), requires_grad=w.requires_grad)
        for module, attr, _ in owners[pid]:
            setattr(module, attr, new)
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Replace every ResuParameter of ``model`` with a plain ``nn.Parameter`` of its effective weight.

    Use it for export: the result is an ordinary PyTorch model (pruned slots are zero in SPARSE mode
    and hold θ in RESU mode). Optimizers built before hold the old parameter objects; build new ones.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify_: `model` must be an nn.Module, got {type(model).__name__}")
    owners = _owners(model)
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if isinstance(p, ResuParameter) and id(p) not in done:
                done[id(p)] = nn.Parameter(p.effective_weight().clone(), requires_grad=p.requires_grad)
    for pid, new in done.items():
        for module, attr, _ in owners[pid]:
            setattr(module, attr, new)
    return model
