"""``sparsify_`` and ``densify_``: converting a model's Linear weights to and from ResuParameters."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from resu.tensors.load_checks import register_load_checks
from resu.tensors.resu_parameter import ResuParameter

FilterFn = Callable[[str, nn.Module], bool]


def _replace_parameter(old: nn.Parameter, new: nn.Parameter, owners: list) -> Callable[[], None]:
    """Put ``new`` where ``old`` is, keeping the Python object when possible; returns the undo.

    ``torch.utils.swap_tensors`` swaps the two objects' contents, so an optimizer (or anything else)
    holding ``old`` sees the new parameter. When swapping is impossible (the old tensor is referenced
    from elsewhere in a way swap_tensors refuses), the modules get ``new`` by attribute assignment.
    """
    grad = old.grad
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        for module, attr, _ in owners:
            setattr(module, attr, new)

        def undo_assignment() -> None:
            for module, attr, _ in owners:
                setattr(module, attr, old)

        return undo_assignment
    old.grad = None

    def undo_swap() -> None:
        torch.utils.swap_tensors(old, new)
        old.grad = grad

    return undo_swap


def _replace_all(replacements: list) -> None:
    """``_replace_parameter`` for every ``(old, new, owners)``: all of them, or none if one fails."""
    undos = []
    try:
        for old, new, owners in replacements:
            undos.append(_replace_parameter(old, new, owners))
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise


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
    Where possible the parameter object itself is kept (its contents are swapped), so an optimizer
    built before still holds the converted weight. Linear layers whose weight is not a registered
    parameter (weight_norm and other parametrizations, uninitialized ``LazyLinear``) are skipped with a
    warning.
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
    skipped_other: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight is None:
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        w = module.weight
        if id(w) not in owners or isinstance(w, nn.parameter.UninitializedParameter):
            skipped_other.append(name)
            continue
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
    if skipped_other:
        warnings.warn(
            "sparsify_: left these Linear layers as they are because their weight is not a plain registered "
            f"parameter (a parametrization such as weight_norm, or an uninitialized lazy weight): {', '.join(skipped_other)}",
            stacklevel=2,
        )
    new = {pid: nn.Parameter(ResuParameter.from_weight(w.data), requires_grad=w.requires_grad) for pid, w in plan.items()}
    _replace_all([(w, new[pid], owners[pid]) for pid, w in plan.items()])
    # load_state_dict then validates every incoming ResuParameter before it copies anything.
    register_load_checks(model)
    if callable(getattr(type(model), "save_pretrained", None)):
        # A Hugging Face model: its own save_pretrained (and Trainer's checkpoints) write the dense export
        # plus resu's layout file, instead of failing inside safetensors on the ResuParameters.
        from resu.io.hf_checkpointing import attach_hf_checkpointing

        attach_hf_checkpointing(model)
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Replace every ResuParameter of ``model`` with a plain ``nn.Parameter`` of its effective weight.

    Use it for export: the result is an ordinary PyTorch model (pruned slots are zero in SPARSE mode
    and hold θ in RESU mode). The parameter objects are kept where possible (their contents are
    swapped); a ResuAdamW built before restarts their states for the dense layout.

    Returns:
        ``model`` itself. All weights are replaced, or (when one replacement fails) none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify_: `model` must be an nn.Module, got {type(model).__name__}")
    owners = _owners(model)
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if isinstance(p, ResuParameter) and id(p) not in done:
                done[id(p)] = nn.Parameter(p.effective_weight().clone(), requires_grad=p.requires_grad)
    by_id = {id(p): p for module in model.modules() for p in module._parameters.values() if p is not None}
    _replace_all([(by_id[pid], new, owners[pid]) for pid, new in done.items()])
    return model
