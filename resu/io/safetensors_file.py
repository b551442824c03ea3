"""``save_safetensors`` / ``load_safetensors_``: a sparsified model in a safetensors file, in every mode.

The file holds plain tensors and a JSON header (:mod:`resu.io.format`), so loading it runs no code;
everything in it is checked against the model before the model is touched.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from resu.io.flatten import flatten_model
from resu.io.format import METADATA_KEY, decode_header, encode_header
from resu.io.load_plan import LoadResult, apply_plan_, plan_load

PathLike = Union[str, os.PathLike]


def save_safetensors(model: nn.Module, path: PathLike, *, metadata: Optional[dict[str, str]] = None) -> None:
    """Write every parameter and buffer of ``model`` to the safetensors file ``path``.

    A ResuParameter is written as its inner tensors (the weight, or in QRESU mode the packed codes,
    scales, zero points and θ; the mask storage outside DENSE mode) and its layout (mode, mask
    encoding, quantization format, RESU-Selective config) goes into the file's metadata as JSON.
    Tied tensors are written once. Restore with :func:`resu.load_safetensors_`.

    Args:
        model: any module (ResuParameters or not).
        path: the file to write.
        metadata: extra string metadata to store beside resu's (any key but ``"resu"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_safetensors: `model` must be an nn.Module, got {type(model).__name__}")
    extra = dict(metadata or {})
    if METADATA_KEY in extra or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError(f"save_safetensors: `metadata` must map str to str and not use the key {METADATA_KEY!r}")
    tensors, params, tied = flatten_model(model)
    save_file(tensors, os.fspath(path), metadata={**extra, METADATA_KEY: encode_header(params, tied)})


def read_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str], str]:
    """``(tensors, params, tied, source)`` of a resu safetensors file (tensors on the CPU)."""
    source = os.fspath(path)
    try:
        with safe_open(source, framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{source}: not a readable safetensors file ({err})") from None
    except Exception as err:  # safetensors' own SafetensorError derives from Exception only
        raise ValueError(f"{source}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    params, tied = decode_header(header, source)
    return tensors, params, tied, source


def load_safetensors_(model: nn.Module, path: PathLike, *, strict: bool = True) -> LoadResult:
    """Restore ``model`` from a file written by :func:`resu.save_safetensors`, in place.

    ``model`` has the same architecture and has been through :func:`resu.sparsify_` (its
    ResuParameters may be in any mode, DENSE included): every ResuParameter takes the file's mode,
    mask, values (codes, scales and θ in QRESU mode), layout id (so a ``ResuAdamW`` state dict saved
    with it continues bitwise), RESU-Selective config and write policy; plain parameters and buffers
    take the file's values. Tensors go to the device of the model's parameter.

    Everything is checked first: keys, shapes, dtypes, the JSON header (format, version, mode, mask
    encoding, quantization format) and the mask contents (counts, index ranges, bitmap padding).
    A problem raises a ValueError naming the parameter and the field, and leaves the model unchanged.

    Args:
        model: the model to load into.
        path: a file written by :func:`resu.save_safetensors`.
        strict: as for ``load_state_dict``: the file's keys must match the model's exactly. With
            ``strict=False`` entries missing from the file are left as they are and extra ones ignored.

    Returns:
        ``(missing_keys, unexpected_keys)``, as ``load_state_dict`` returns.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_safetensors_: `model` must be an nn.Module, got {type(model).__name__}")
    tensors, params, tied, source = read_file(path)
    plan = plan_load(model, tensors, params, tied, strict=strict, source=source)
    return apply_plan_(model, plan)
