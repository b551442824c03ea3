"""What a cycle and the trainer share: the user's parts of a run, checked once."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from resu.training.config import RESUConfig
from resu.training.phases import ensure_sparsified

TrainFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module], Any]


def check_training_args(model, config, optimizer, train_fn, eval_fn) -> None:
    """Clear errors for the arguments shared by RESUCycle and RESUTrainer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, RESUConfig):
        raise TypeError(f"`config` must be a RESUConfig, got {type(config).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(train_fn):
        raise TypeError("`train_fn` must be a callable train_fn(model, batch) -> loss")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("`eval_fn` must be a callable eval_fn(model) -> dict of metrics (or a number)")


class TrainingSetup:
    """The model (sparsified on the way in), config, optimizer and user callables of a run."""

    def __init__(self, model, config, optimizer, train_fn, eval_fn: Optional[EvalFn], pruner: Any, stabilizer: Any):
        check_training_args(model, config, optimizer, train_fn, eval_fn)
        self.model = ensure_sparsified(model)
        self.config = config
        self.optimizer = optimizer
        self.train_fn = train_fn
        self.eval_fn = eval_fn
        self.pruner = pruner
        self.stabilizer = stabilizer
