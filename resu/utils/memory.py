"""Memory accounting of tensors, ResuParameters, layers and models.

Sizes are *logical*: ``numel × element_size`` of the tensors a weight owns (an allocator may hold
more). :func:`get_tensor_memory` and :func:`measure_layer_memory` report MB (2**20 bytes) as seed 000
does; :func:`parameter_memory` and :func:`model_memory` report exact byte counts (ints).

What a :class:`~resu.tensors.resu_parameter.ResuParameter` owns, by mode:

- DENSE / SPARSE / RESU: the dense ``_weight`` (θ lives in its pruned slots in RESU mode), plus the
  mask encoding ``_mask_storage`` outside DENSE;
- QRESU: packed codes ``_qdata``, scales and zero points ``_qscale``/``_qzero``, the flat θ ``_theta``
  and the mask; no dense weight.

Example::

    mem_mb = get_tensor_memory(layer.weight)
    breakdown = parameter_memory(layer.weight, optimizer)   # bytes per part
    report = model_memory(model, optimizer)                 # summed, plus per-parameter breakdowns
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from resu.tensors.compact_grad import CompactGrad
from resu.tensors.resu_parameter import ResuParameter

__all__ = ["BREAKDOWN_KEYS", "get_tensor_memory", "measure_layer_memory", "model_memory", "parameter_memory"]

MB = 1024 * 1024

#: The keys of :func:`parameter_memory`'s result, all in bytes.
BREAKDOWN_KEYS = ("weight", "codes", "scales", "theta", "mask", "grad", "optimizer_states", "total")

Optimizers = Union[None, torch.optim.Optimizer, Iterable[torch.optim.Optimizer]]


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def tensor_nbytes(tensor: Optional[torch.Tensor]) -> int:
    """Bytes a tensor's values occupy (0 for None).

    A ResuParameter counts its value storage without the mask (reported separately as ``mask``): the
    dense weight, or in QRESU mode its codes, scales, zero points and θ. A CompactGrad counts its θ
    values (its mask storage is the weight's). Any other tensor: ``numel × element_size``.
    """
    if isinstance(tensor, ResuParameter):
        if tensor._weight is not None:
            return _nbytes(tensor._weight)
        return sum(_nbytes(t) for t in (tensor._qdata, tensor._qscale, tensor._qzero, tensor._theta))
    if isinstance(tensor, CompactGrad):
        return _nbytes(tensor.values)
    return _nbytes(tensor)


def get_tensor_memory(tensor: Optional[torch.Tensor]) -> float:
    """Memory used by ``tensor`` in MB (0.0 for None); see :func:`tensor_nbytes` for what is counted."""
    return tensor_nbytes(tensor) / MB


def _optimizer_list(optimizer: Optimizers) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    optimizers = list(optimizer)
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, a list of them or None, got {type(opt).__name__}")
    return optimizers


def _state_nbytes(optimizers: list, key: torch.Tensor) -> int:
    total = 0
    for opt in optimizers:
        for value in opt.state.get(key, {}).values():
            if isinstance(value, torch.Tensor):
                total += _nbytes(value)
    return total


def _grad_nbytes(p: torch.Tensor) -> int:
    """Gradient bytes of ``p``; a QRESU θ gradient sharing storage with the weight's counts once."""
    grads = [p.grad.values if isinstance(p.grad, CompactGrad) else p.grad]
    theta = getattr(p, "_theta", None) if isinstance(p, ResuParameter) else None
    if theta is not None:
        grads.append(theta.grad)
    seen, total = set(), 0
    for g in grads:
        if g is None:
            continue
        key = (g.untyped_storage().data_ptr(), g.storage_offset(), g.numel())
        if key not in seen:
            seen.add(key)
            total += _nbytes(g)
    return total


def parameter_memory(p: torch.Tensor, optimizer: Optimizers = None) -> dict:
    """Byte breakdown of one parameter: the keys of :data:`BREAKDOWN_KEYS`, each an int.

    - ``weight``: the dense weight (a plain parameter's values; 0 in QRESU mode);
    - ``codes``, ``scales`` (scales + zero points), ``theta``: the QRESU storage (0 otherwise; in RESU
      mode θ lives inside ``weight``);
    - ``mask``: the mask encoding (0 in DENSE mode);
    - ``grad``: ``p.grad`` (a CompactGrad's θ values only) and, in QRESU mode, ``_theta.grad`` when it
      has its own storage;
    - ``optimizer_states``: tensors ``optimizer`` (one, a list, or None) keeps for ``p`` (and for its
      ``_theta``, which a stock optimizer may train);
    - ``total``: their sum.
    """
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"parameter_memory: `p` must be a tensor, got {type(p).__name__}")
    optimizers = _optimizer_list(optimizer)
    out = dict.fromkeys(BREAKDOWN_KEYS, 0)
    if isinstance(p, ResuParameter):
        out["weight"] = _nbytes(p._weight)
        out["codes"] = _nbytes(p._qdata)
        out["scales"] = _nbytes(p._qscale) + _nbytes(p._qzero)
        out["theta"] = _nbytes(p._theta)
        out["mask"] = p.mask_nbytes
    else:
        out["weight"] = _nbytes(p)
    out["grad"] = _grad_nbytes(p)
    states = _state_nbytes(optimizers, p)
    theta = getattr(p, "_theta", None) if isinstance(p, ResuParameter) else None
    if theta is not None:
        states += _state_nbytes(optimizers, theta)
    out["optimizer_states"] = states
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


def model_memory(model: nn.Module, optimizer: Optimizers = None) -> dict:
    """Byte totals over every parameter of ``model`` (tied parameters once), with the breakdowns.

    Returns the keys of :data:`BREAKDOWN_KEYS` summed over parameters, plus ``"parameters"``: a dict
    ``{qualified name: parameter_memory(...)}``. The optimizers of QRESU-Selective ``RESULinear``
    layers (which step θ themselves) are counted along with ``optimizer``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_memory: `model` must be an nn.Module, got {type(model).__name__}")
    optimizers = _optimizer_list(optimizer)
    for module in model.modules():
        own = getattr(module, "_selective_optimizer", None)
        if isinstance(own, torch.optim.Optimizer) and all(own is not o for o in optimizers):
            optimizers.append(own)
    per_param = {name: parameter_memory(p, optimizers) for name, p in model.named_parameters()}
    out = {k: sum(b[k] for b in per_param.values()) for k in BREAKDOWN_KEYS}
    out["parameters"] = per_param
    return out


def measure_layer_memory(layer: nn.Module) -> dict:
    """Seed 000's breakdown of a ``RESULinear`` (its weight only), in MB.

    Keys: ``weight`` (dense weight; DENSE/SPARSE/RESU modes), ``mask`` (when pruned), ``theta``,
    ``W_A_quantized`` and ``qparams`` (scales + zero points) in QRESU modes, ``selective_states``
    (QRESU-Selective: the layer's own optimizer states, once it has stepped), and ``total``.
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, ResuParameter):
        raise ValueError(
            "measure_layer_memory: `layer` must be a RESULinear (or a Linear converted by resu.sparsify_)"
        )
    breakdown = {}
    if weight._weight is not None:
        breakdown["weight"] = get_tensor_memory(weight._weight)
    if weight.mode.has_mask:
        breakdown["mask"] = weight.mask_nbytes / MB
    if weight._theta is not None:
        breakdown["theta"] = get_tensor_memory(weight._theta)
        breakdown["W_A_quantized"] = get_tensor_memory(weight._qdata)
        breakdown["qparams"] = get_tensor_memory(weight._qscale) + get_tensor_memory(weight._qzero)
    own = getattr(layer, "_selective_optimizer", None)
    if own is not None and own.state.get(weight):
        breakdown["selective_states"] = _state_nbytes([own], weight) / MB
    breakdown["total"] = sum(breakdown.values())
    return breakdown
