"""Argument checks shared by the mask kernels and :class:`~resu.tensors.mask.SparseMask`."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

#: Flat indices are stored as int32, so a mask covers fewer than 2**31 weights.
MAX_NUMEL = 2**31 - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_numel(numel: int, name: str) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(
            f"{name} has {numel} elements; flat indices are stored as int32, "
            f"so at most {MAX_NUMEL} elements are supported"
        )


def _normalize_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        dims = tuple(shape)
    elif isinstance(shape, int) and not isinstance(shape, bool):
        dims = (shape,)
    elif isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)):
        dims = tuple(shape)
    else:
        raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    out = []
    for d in dims:
        try:
            if isinstance(d, bool):
                raise TypeError
            d = operator.index(d)
        except TypeError:
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}") from None
        if d < 0:
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
        out.append(d)
    shape_t = tuple(out)
    _check_numel(math.prod(shape_t), f"shape {shape_t}")
    return shape_t


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1:
            sparsity = float(sparsity)
        else:
            raise ValueError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    s = float(sparsity)
    if math.isnan(s) or s < 0.0 or s > 1.0:
        raise ValueError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    return s
