"""Validation of ``ResuAdamW`` state entries loaded from a checkpoint (:func:`check_optimizer_state`).

One state entry (Adam moments, step counter, RESU-Selective buffers and subset indices) is checked
against the slots it belongs to before ``ResuAdamW.load_state_dict`` changes anything: a state one
element short would let the AdamW kernels write past its end. This module mirrors the optimizer's state
layout rather than importing the optimizer (its tests compare the two).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from resu.tensors.validate import CheckpointError, _describe, _is_int

if TYPE_CHECKING:
    from resu.optim.selection_config import SelectionConfig

__all__ = ["check_optimizer_state"]

_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_EMA_KEYS = ("selection_m", "selection_v")


def _selection_layout(config: SelectionConfig, n_slots: int) -> tuple[tuple[int, int], int]:
    """``(tag, Adam state length)`` of a selective weight, as ``resu.optim.selective.state_layout``."""
    from resu.core.selective import STRATEGIES

    code = STRATEGIES.index(config.strategy)
    if config.is_static:
        k = config.select_count(n_slots)
        return (code, k), k
    return (code, 0), n_slots


def _as_tag(tag: Any) -> Optional[tuple]:
    return tuple(tag) if isinstance(tag, (tuple, list)) else tag


def _scalar_value(name: str, field: str, t: Any, *, integral_dtype: bool) -> float:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise CheckpointError(name, field, "a one-element tensor", _describe(t))
    if integral_dtype and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise CheckpointError(name, f"{field}.dtype", "an integer dtype", str(t.dtype))
    if not integral_dtype and (t.is_complex() or t.dtype == torch.bool):
        raise CheckpointError(name, f"{field}.dtype", "a real dtype", str(t.dtype))
    return t.item()  # a host counter in ResuAdamW states; at most one sync, once per load


def _check_state_tensor(name, field, t, length_or_shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointError(name, field, "a plain tensor", _describe(t))
    if not t.is_floating_point():
        raise CheckpointError(name, f"{field}.dtype", "a floating-point dtype", str(t.dtype))
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(name, f"{field}.dtype", str(dtype), str(t.dtype))
    if device is not None and t.device != torch.device(device):
        raise CheckpointError(name, f"{field}.device", str(device), str(t.device))
    if length_or_shape is not None:
        want = (length_or_shape,) if _is_int(length_or_shape) else tuple(length_or_shape)
        if tuple(t.shape) != want:
            raise CheckpointError(name, f"{field}.shape", f"{want} (one entry per trainable slot)", str(tuple(t.shape)))
    if not t.is_contiguous():
        raise CheckpointError(name, field, "contiguous (the kernels take raw pointers)", f"strides {t.stride()}")


def _check_index_vector(name, field, t, length, bound) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise CheckpointError(name, field, "an int64 tensor", _describe(t))
    if tuple(t.shape) != (length,):
        raise CheckpointError(name, f"{field}.shape", f"({length},)", str(tuple(t.shape)))
    if not t.is_contiguous():
        raise CheckpointError(name, field, "contiguous", f"strides {t.stride()}")
    if length:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= bound:
            raise CheckpointError(name, field, f"indices in [0, {bound})", f"values in [{lo}, {hi}]")
        if length > 1 and not bool((t[1:] > t[:-1]).all()):
            raise CheckpointError(name, field, "strictly increasing (sorted, unique) indices", "unsorted or duplicated")
    return t


def check_optimizer_state(
    name: str,
    state: Mapping[str, Any],
    n_slots: Union[int, Sequence[int]],
    dtype: Optional[torch.dtype],
    *,
    device: Optional[Union[torch.device, str]] = None,
    selective: Optional["SelectionConfig"] = None,
    theta_positions: Optional[torch.Tensor] = None,
) -> None:
    """Check one ``ResuAdamW`` state entry against the slots it trains.

    Call it for a state the optimizer will use as it is: one whose ``layout_id`` equals the parameter's
    (``ResuAdamW`` restarts a state of another layout from zero, resizing its buffers). Before
    ``Optimizer.load_state_dict`` casts states, pass ``dtype=None``/``device=None`` (any floating dtype,
    any device); after, the parameter's.

    Args:
        name: the parameter's name, for messages.
        state: the entry (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``layout_id``,
            ``selection`` and the RESU-Selective buffers).
        n_slots: trainable slots of the parameter: an int (SPARSE: active slots; RESU/QRESU: ``n_pruned``),
            or the weight's shape when every slot trains (DENSE, plain parameters).
        dtype: the dtype the moments must have, or None for any floating dtype.
        device: the device the moments must be on, or None.
        selective: the :class:`SelectionConfig` applied to this weight, or None.
        theta_positions: static selective strategies on a RESU weight: the flat positions of its θ slots
            in the weight (ascending pruned indices), to check ``subset_positions``; None when θ is its own
            vector (QRESU), where the positions are the subset itself.

    Raises:
        CheckpointError: naming ``name`` and the state key.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(name, "state", "a mapping", _describe(state))
    if len(state) == 0:
        return  # a fresh state: the optimizer builds it on the first step
    if not (_is_int(n_slots) and n_slots >= 0) and not (
        isinstance(n_slots, (tuple, list, torch.Size)) and all(_is_int(d) and d >= 0 for d in n_slots)
    ):
        raise ValueError(f"check_optimizer_state: `n_slots` must be an int >= 0 or a shape, got {n_slots!r}")

    step = _scalar_value(name, "step", state.get("step"), integral_dtype=False)
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise CheckpointError(name, "step", "a finite whole number >= 0", repr(step))
    if "layout_id" in state and not _is_int(state["layout_id"]):
        raise CheckpointError(name, "layout_id", "an int", repr(state["layout_id"]))
    tag = _as_tag(state.get("selection"))
    if tag is not None and not (len(tag) == 2 and all(_is_int(x) for x in tag)):
        raise CheckpointError(name, "selection", "None or a pair of ints (strategy, k)", repr(state.get("selection")))
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            raise CheckpointError(name, key, "present in a non-empty state", "missing")

    # Which layout the optimizer will read the buffers with; any other tag makes it restart them.
    if selective is None:
        expected_tag, length = None, n_slots
    else:
        if not _is_int(n_slots):
            raise ValueError("check_optimizer_state: selective states need `n_slots` as an int (θ slots)")
        expected_tag, length = _selection_layout(selective, n_slots)
    reused = tag == expected_tag
    for key in _ADAM_KEYS:
        if key in state:
            _check_state_tensor(name, key, state[key], length if reused else None, dtype, device)
    if not reused or selective is None:
        return

    if not selective.is_static:
        for key in _EMA_KEYS:
            if key in state:
                _check_state_tensor(name, key, state[key], n_slots, dtype, device)
        return
    if "subset" not in state:
        return  # chosen afresh at the next step
    k = length
    subset = _check_index_vector(name, "subset", state["subset"], k, n_slots)
    positions = state.get("subset_positions")
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64 or tuple(positions.shape) != (k,):
        raise CheckpointError(name, "subset_positions", f"an int64 tensor of shape ({k},)", _describe(positions))
    if theta_positions is None:
        expected = subset  # θ is its own vector: a slot's position is its θ index
    else:
        if theta_positions.numel() != n_slots:
            raise ValueError(f"check_optimizer_state: `theta_positions` must have n_slots={n_slots} entries")
        expected = theta_positions.to(subset.device, torch.int64).index_select(0, subset)
    if not positions.is_contiguous() or not torch.equal(positions.to(expected.device), expected):
        raise CheckpointError(
            name, "subset_positions", "the contiguous flat positions of the `subset` θ slots", "other positions"
        )
    if "subset_choices" in state:
        choices = _scalar_value(name, "subset_choices", state["subset_choices"], integral_dtype=True)
        if choices < 0:
            raise CheckpointError(name, "subset_choices", "an int >= 0", repr(choices))
    if "subset_seed" in state:
        seed = _scalar_value(name, "subset_seed", state["subset_seed"], integral_dtype=True)
        if not 0 <= seed < 2**62:
            raise CheckpointError(name, "subset_seed", "an int in [0, 2**62)", repr(seed))
