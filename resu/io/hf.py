"""Hugging Face: ``save_pretrained`` export of a sparsified model, and restoring resu's layout from it.

:func:`save_pretrained` calls the model's own ``save_pretrained`` with a state dict of ordinary dense
tensors (every ResuParameter as its effective weight: exact zeros at pruned slots in SPARSE mode, θ in
them in RESU mode, dequantized codes merged with θ in QRESU mode), so plain ``transformers`` loads the
directory with ``from_pretrained`` and computes what the sparsified model computes. Beside the weights
it writes :data:`LAYOUT_FILE`: resu's safetensors format (:mod:`resu.io.format`) for the ResuParameters
only, without their dense weights (they are in the model's own files), so the masks, modes and
(QRESU) codes, scales and θ come back exactly with :func:`load_pretrained_`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from resu.io.flatten import flatten_model
from resu.io.format import METADATA_KEY, encode_header, inner_key
from resu.io.load_plan import LoadResult, apply_plan_, plan_load
from resu.io.safetensors_file import PathLike, read_file
from resu.tensors.resu_parameter import ResuParameter

#: resu's layout file, written beside the model's weights.
LAYOUT_FILE = "resu_layout.safetensors"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def dense_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every ResuParameter replaced by its effective dense weight (a plain tensor)."""
    return {k: v.effective_weight() if isinstance(v, ResuParameter) else v for k, v in state_dict.items()}


def save_pretrained(model: nn.Module, save_directory: PathLike, *, state_dict: Optional[dict] = None, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` for a sparsified Hugging Face model.

    The weights are written as ordinary dense tensors (the effective weights), so
    ``AutoModel*.from_pretrained(save_directory)`` without resu reproduces the model's outputs: that
    is the export for serving. resu's layout (modes, masks, quantized codes, θ, RESU-Selective
    configs) goes to ``save_directory/resu_layout.safetensors``; :func:`resu.load_pretrained_` restores it.

    Args:
        model: a ``transformers.PreTrainedModel`` (ResuParameters in any mode, or none).
        save_directory: the directory to write.
        state_dict: the state dict to save (default ``model.state_dict()``); ResuParameters in it are
            written dense as well.
        **kwargs: passed on to ``model.save_pretrained`` (``max_shard_size``, ``is_main_process``, ...).
    """
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise TypeError(
            f"save_pretrained: `model` must be a Hugging Face model with a save_pretrained method, got "
            f"{type(model).__name__}; use resu.save_safetensors(model, path) for other models"
        )
    if state_dict is None:
        state_dict = model.state_dict()
    # The class's method: the instance's own may route here (resu.io.hf_checkpointing).
    type(model).save_pretrained(model, save_directory, state_dict=dense_state_dict(state_dict), **kwargs)
    layout_path = os.path.join(os.fspath(save_directory), LAYOUT_FILE)
    if not kwargs.get("is_main_process", True):
        return
    tensors, params, tied = flatten_model(model, include=lambda key, v: isinstance(v, ResuParameter))
    for name in params:
        tensors.pop(inner_key(name, "_weight"), None)  # the dense weight is the model's own file's
    save_file(tensors, layout_path, metadata={METADATA_KEY: encode_header(params, tied)})


def _dense_weights(directory: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` from the model's safetensors weights in ``directory`` (sharded or not)."""
    index = os.path.join(directory, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
    elif os.path.isfile(os.path.join(directory, _WEIGHTS)):
        weight_map = {k: _WEIGHTS for k in keys}
    else:
        raise ValueError(
            f"{directory}: no {_WEIGHTS} or {_INDEX}; save the model with resu.save_pretrained(model, directory) "
            "(safetensors weights)"
        )
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for key in keys:
        if key in weight_map:
            by_file.setdefault(weight_map[key], []).append(key)
    for filename, names in by_file.items():
        path = os.path.join(directory, filename)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                present = set(f.keys())
                out.update({k: f.get_tensor(k) for k in names if k in present})
        except Exception as err:  # safetensors' own errors derive from Exception only
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return out


def load_pretrained_(model: nn.Module, directory: PathLike, *, strict: bool = True) -> LoadResult:
    """Restore the resu layout saved by :func:`resu.save_pretrained` into ``model``, in place.

    ``model`` is the same architecture after :func:`resu.sparsify_` (with the same ``filter_fn``),
    typically ``resu.sparsify_(AutoModelForCausalLM.from_pretrained(directory))``. Every
    ResuParameter takes the saved mode, mask, weight (from the directory's weight files) or, in QRESU
    mode, codes, scales and θ, exactly; the other parameters and buffers are left as they are.
    Everything is checked before anything changes, as in :func:`resu.load_safetensors_`.

    Args:
        model: the model to restore.
        directory: a directory written by :func:`resu.save_pretrained`.
        strict: every ResuParameter of the model must be in the layout file and no more.

    Returns:
        ``(missing_keys, unexpected_keys)`` over the ResuParameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained_: `model` must be an nn.Module, got {type(model).__name__}")
    directory = os.fspath(directory)
    layout_path = os.path.join(directory, LAYOUT_FILE)
    if not os.path.isfile(layout_path):
        raise ValueError(f"{directory}: no {LAYOUT_FILE}; was it written by resu.save_pretrained(model, directory)?")
    tensors, params, tied, source = read_file(layout_path)
    needs_weight = [
        name for name, entry in params.items()
        if not (isinstance(entry.get("layout"), dict) and entry["layout"].get("mode") == "qresu")
    ]
    for name, weight in _dense_weights(directory, needs_weight).items():
        tensors[inner_key(name, "_weight")] = weight
    plan = plan_load(model, tensors, params, tied, strict=strict, source=source, resu_only=True)
    return apply_plan_(model, plan)
