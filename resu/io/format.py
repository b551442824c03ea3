"""The resu safetensors format: tensor keys and the versioned JSON header stored in the file's metadata.

A file holds plain tensors only, so loading it runs no code:

- a ResuParameter ``name`` in mode M is stored as its inner tensors (:data:`resu.tensors.layout.INNER_TENSORS`),
  one key each: ``"{name}.weight"`` (the dense weight, θ in its pruned slots in RESU mode),
  ``"{name}.mask_storage"``, and in QRESU mode ``"{name}.qdata"`` (packed codes), ``"{name}.qscale"``,
  ``"{name}.qzero"`` and ``"{name}.theta"``;
- any other parameter or buffer is stored under its ``state_dict`` key.

The safetensors metadata (a str → str map) holds one JSON document under :data:`METADATA_KEY`::

    {"format": "resu", "version": 1,
     "params": {"fc.weight": {"shape": [20, 12], "dtype": "float32", "layout": {...ResuLayout.to_dict()...}}},
     "tied": {"decoder.weight": "encoder.weight"}}

``tied`` maps a ``state_dict`` key whose tensor is the same object (or the same storage) as another
key's to the key it was saved under: safetensors refuses shared storage, so each tensor is written once.
Other metadata entries are the caller's own (``metadata=`` of :func:`resu.save_safetensors`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

#: The safetensors metadata entry holding resu's JSON header.
METADATA_KEY = "resu"
FORMAT_NAME = "resu"
FORMAT_VERSION = 1


def inner_key(name: str, inner: str) -> str:
    """The file key of inner tensor ``inner`` (``"_qdata"``) of the ResuParameter ``name``."""
    return f"{name}.{inner.lstrip('_')}"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, where: str) -> torch.dtype:
    """The torch dtype called ``name``; a ValueError naming ``where`` if there is none."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: `dtype` must name a torch dtype, found {name!r}")
    return dtype


def encode_header(params: dict[str, dict], tied: dict[str, str]) -> str:
    return json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "params": params, "tied": tied})


def decode_header(text: Any, source: str) -> tuple[dict[str, dict], dict[str, str]]:
    """``(params, tied)`` from the JSON header; a ValueError naming ``source`` and the field when malformed."""
    if text is None:
        raise ValueError(
            f"{source}: no `{METADATA_KEY}` entry in the safetensors metadata; the file was not written by "
            "resu.save_safetensors (load a plain state dict with safetensors.torch.load_file + load_state_dict)"
        )
    try:
        doc = json.loads(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: the `{METADATA_KEY}` metadata is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ValueError(f"{source}: the `{METADATA_KEY}` metadata must be a JSON object with \"format\": \"resu\"")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{source}: unknown resu format `version` {doc.get('version')!r}; this resu reads version {FORMAT_VERSION}"
        )
    params, tied = doc.get("params"), doc.get("tied", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: `params` must map parameter names to objects")
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError(f"{source}: `tied` must map state_dict keys to the keys they were saved under")
    unknown = sorted(set(doc) - {"format", "version", "params", "tied"})
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown} in the `{METADATA_KEY}` metadata")
    return params, tied
