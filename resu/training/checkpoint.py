"""Checking a :class:`~resu.training.trainer.RESUTrainer` state dict before any of it is applied.

``RESUTrainer.load_state_dict`` is all-or-nothing: :func:`check_trainer_state` validates every part
(version, counters, stats, RNG states, loader position, model keys and shapes, optimizer groups)
first; :func:`restored_on_error` then guards the parts that are applied by other code (the model's
and the optimizer's ``load_state_dict``) and puts the model and optimizer back if one fails.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from resu.api.params import resu_parameters
from resu.api.transaction import all_or_nothing
from resu.tensors.resu_parameter import ResuParameter
from resu.training.stats import CycleStats

STATE_VERSION = 1
_CALLER = "RESUTrainer.load_state_dict"
_KEYS = ("cycle", "config", "model", "optimizer", "stats", "generator", "torch_rng", "stream")


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"{_CALLER}: {field!r} {problem}; the trainer is unchanged")


def _check_count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _fail(field, f"must be an integer >= 0, got {value!r}")
    return int(value)


def _check_rng_state(value: Any, field: str) -> None:
    """A CPU generator state: a uint8 tensor that a generator accepts (tried on a scratch one)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise _fail(field, f"must be a uint8 RNG state tensor, got {type(value).__name__}")
    try:
        torch.Generator().set_state(value)
    except (RuntimeError, ValueError) as err:
        raise _fail(field, f"is not a valid RNG state ({err})") from None


def _check_stream(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or not {"epoch", "position", "rng_at_epoch_start"} <= set(value):
        raise _fail("stream", "must be None or a dict with 'epoch', 'position' and 'rng_at_epoch_start'")
    _check_count(value["epoch"], "stream.epoch")
    _check_count(value["position"], "stream.position")
    if value["rng_at_epoch_start"] is not None:
        _check_rng_state(value["rng_at_epoch_start"], "stream.rng_at_epoch_start")


def _check_model_state(saved: Any, model: nn.Module) -> None:
    if not isinstance(saved, Mapping):
        raise _fail("model", f"must be a state dict, got {type(saved).__name__}")
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise _fail("model", f"does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    for key, value in current.items():
        other = saved[key]
        if not isinstance(other, torch.Tensor) or other.shape != value.shape:
            got = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise _fail("model", f"entry {key!r} has shape {got}, the model's has {tuple(value.shape)}")


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) or not isinstance(
        saved.get("state"), Mapping
    ):
        raise _fail("optimizer", "must be an optimizer state dict with 'state' and 'param_groups'")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise _fail("optimizer", f"has {len(groups)} parameter groups, the optimizer has {len(optimizer.param_groups)}")
    for i, (group, own) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(group, Mapping) or len(group.get("params", ())) != len(own["params"]):
            raise _fail("optimizer", f"parameter group {i} does not hold as many parameters as the optimizer's")


def check_trainer_state(state: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[CycleStats]:
    """Validate a RESUTrainer ``state`` against ``model`` and ``optimizer`` without changing anything.

    Returns the parsed :class:`CycleStats`. Raises a ValueError naming the bad field.
    """
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{_CALLER}: not a RESUTrainer state_dict (missing or unknown 'version')")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"{_CALLER}: the state_dict lacks {missing}; the trainer is unchanged")
    _check_count(state["cycle"], "cycle")
    if not isinstance(state["stats"], list):
        raise _fail("stats", f"must be a list of CycleStats dicts, got {type(state['stats']).__name__}")
    try:
        stats = [CycleStats.from_dict(d) for d in state["stats"]]
    except (TypeError, AttributeError) as err:
        raise _fail("stats", f"holds an entry that is not a CycleStats dict ({err})") from None
    _check_rng_state(state["generator"], "generator")
    _check_rng_state(state["torch_rng"], "torch_rng")
    _check_stream(state["stream"])
    _check_model_state(state["model"], model)
    _check_optimizer_state(state["optimizer"], optimizer)
    return stats


@contextmanager
def restored_on_error(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run the body; if it raises, ``model`` (its ResuParameters bitwise, its other parameters and
    buffers by value) and ``optimizer`` (its state dict) are put back first."""
    plain = {k: v.detach().clone() for k, v in model.state_dict().items() if not isinstance(v, ResuParameter)}
    # load_state_dict replaces the optimizer's state objects rather than writing into them, so the
    # current ones are a complete snapshot.
    optimizer_state = optimizer.state_dict()
    with all_or_nothing(p for _, p in resu_parameters(model)):
        try:
            yield
        except BaseException:
            model.load_state_dict(plain, strict=False)
            optimizer.load_state_dict(optimizer_state)
            raise
