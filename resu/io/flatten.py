"""A model as plain tensors plus resu's JSON header: what :func:`resu.save_safetensors` writes."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from resu.io.format import dtype_name, inner_key
from resu.tensors.resu_parameter import ResuParameter


def _storage_key(key: str, t: torch.Tensor) -> tuple:
    """Where a plain tensor's bytes live."""
    if t.device.type == "meta":
        raise ValueError(f"save_safetensors: `{key}` is on the meta device (it has no values); materialize the model first")
    return (t.device, t.untyped_storage().data_ptr())


def flatten_model(
    model: nn.Module, include: Callable[[str, torch.Tensor], bool] = lambda key, t: True
) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """``(tensors, params, tied)`` for every ``state_dict`` entry of ``model`` that ``include`` accepts.

    ``tensors`` maps file keys to plain contiguous tensors, ``params`` holds the JSON entry of every
    ResuParameter (shape, dtype, layout) and ``tied`` maps a key whose tensor is another key's (the
    same object, or a view of the same bytes with the same shape and strides) to that key. A plain
    tensor that only partly overlaps another one is written as its own copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, dict] = {}
    tied: dict[str, str] = {}
    first_key: dict[object, str] = {}
    storages: set = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor) or not include(key, value):
            continue
        value = value.detach() if not isinstance(value, ResuParameter) else value
        if isinstance(value, ResuParameter):
            identity = ("resu", id(value))
        else:
            where = _storage_key(key, value)
            identity = ("plain", where, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if identity in first_key:
            tied[key] = first_key[identity]
            continue
        first_key[identity] = key
        if isinstance(value, ResuParameter):
            params[key] = {"shape": list(value.shape), "dtype": dtype_name(value.dtype), "layout": value.resu_layout.to_dict()}
            for attr, t in zip(*_inner_of(value)):
                tensors[inner_key(key, attr)] = t.detach().contiguous()
            continue
        where = identity[1]
        shared = where in storages
        storages.add(where)
        tensors[key] = value.clone(memory_format=torch.contiguous_format) if shared else value.contiguous()
    return tensors, params, tied


def _inner_of(p: ResuParameter) -> tuple[list[str], list[torch.Tensor]]:
    names, _ = p.__tensor_flatten__()
    return names, [getattr(p, n) for n in names]
