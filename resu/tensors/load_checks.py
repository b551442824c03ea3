"""``load_state_dict`` validation: every incoming ResuParameter is checked, under its key, before anything is copied.

``Module.load_state_dict`` copies parameter by parameter, so a bad entry found by ``copy_`` would leave
the modules before it loaded and the ones after it not. :func:`check_incoming_state` runs as a
load-state-dict pre-hook of the whole model (:func:`resu.sparsify_` registers it), which torch calls
before the first copy: a checkpoint is refused as a whole, with an error naming the real key.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resu.tensors.resu_parameter import ResuParameter
from resu.tensors.validate import CheckpointError, validate_parameter

_HOOKED = "_resu_load_check_registered"


def check_incoming_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load-state-dict pre-hook: validate every entry of ``state_dict`` under ``prefix`` that is (or is
    loaded into) a ResuParameter. Raises :class:`~resu.tensors.validate.CheckpointError` (or the
    RuntimeError ``copy_`` would raise) before any parameter changes."""
    own = {prefix + name: p for name, p in module.named_parameters(remove_duplicate=False)}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        target = own.get(key)
        if isinstance(value, ResuParameter):
            validate_parameter(key, value)
            if target is not None and tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(key, "shape", f"the model's {tuple(target.shape)}", str(tuple(value.shape)))
        elif isinstance(target, ResuParameter) and isinstance(value, torch.Tensor) and target.mode.trains_theta:
            raise RuntimeError(
                f"load_state_dict: `{key}` is a plain tensor, but the model's weight is in {target.mode.name} mode; "
                "copying it would overwrite the frozen active weights and θ. Load it before resu.enter_resu_ / "
                "resu.enter_qresu_, or load a state_dict saved from a model with ResuParameters (it carries mode and mask)."
            )


def register_load_checks(model: nn.Module) -> None:
    """Register :func:`check_incoming_state` on ``model`` (once)."""
    if not getattr(model, _HOOKED, False):
        model.register_load_state_dict_pre_hook(check_incoming_state)
        setattr(model, _HOOKED, True)


__all__ = ["check_incoming_state", "register_load_checks"]
