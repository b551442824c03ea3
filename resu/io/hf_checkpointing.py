"""Making one Hugging Face model's own checkpoint paths resu-aware (what ``transformers.Trainer`` calls).

Hugging Face's ``save_pretrained`` reads ``model.state_dict()``, which holds the ResuParameters
themselves (that keeps ``torch.save`` round trips exact), and safetensors cannot write those; its
``Trainer`` resumes by ``load_state_dict`` of the dense export, which a RESU/QRESU weight refuses.
:func:`attach_hf_checkpointing` routes the first to :func:`resu.save_pretrained` and lets the second
through when the tensors are the model's own export.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resu.io.hf import save_pretrained
from resu.io.safetensors_file import PathLike
from resu.tensors.resu_parameter import ResuParameter


class _SavePretrained:
    """What :func:`attach_hf_checkpointing` puts at ``model.save_pretrained``: :func:`save_pretrained` for this model.

    A small object rather than a bound method, so ``copy.deepcopy`` binds the copy to the copied model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: PathLike, *args, **kwargs) -> None:
        if args:
            raise TypeError("save_pretrained: pass every argument after `save_directory` by keyword")
        save_pretrained(self.model, save_directory, **kwargs)


def _keep_own_export(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: a plain tensor equal to a ResuParameter's effective weight is that
    parameter's own export, so the parameter stays as it is (mode, mask, θ) instead of being refused.

    A RESU/QRESU weight refuses a plain copy (it would overwrite frozen weights and θ). Resuming a
    ``transformers.Trainer`` reloads the checkpoint's dense export after :func:`load_pretrained_` has
    restored the layout; those tensors equal the effective weights bitwise, and loading them is a
    no-op. A tensor that differs is refused here, before anything is loaded."""
    for name, p in module.named_parameters():
        key = prefix + name
        value = state_dict.get(key)
        if not isinstance(p, ResuParameter) or not isinstance(value, torch.Tensor) or isinstance(value, ResuParameter):
            continue
        if value.shape == p.shape and value.dtype == p.dtype and torch.equal(value.to(p.device), p.effective_weight()):
            state_dict[key] = p
        elif p.mode.trains_theta:
            raise ValueError(
                f"load_state_dict: `{key}` is a ResuParameter in {p.mode.value} mode and the dense tensor given for it "
                "is not its effective weight; restore the checkpoint's layout first with resu.load_pretrained_(model, "
                "checkpoint_directory) (Trainer: before trainer.train(resume_from_checkpoint=...)); the model is unchanged"
            )


def attach_hf_checkpointing(model: nn.Module) -> nn.Module:
    """Make this Hugging Face model's own checkpoint paths resu-aware, in place (``transformers.Trainer`` uses them).

    - ``model.save_pretrained(d, ...)`` calls :func:`resu.save_pretrained`: the dense export plus
      ``resu_layout.safetensors``. (Hugging Face's own ``save_pretrained`` reads ``model.state_dict()``,
      which holds the ResuParameters themselves, and safetensors cannot write those.)
    - ``model.load_state_dict`` of that dense export into the model it describes (after
      :func:`resu.load_pretrained_`) keeps every ResuParameter as it is, so ``Trainer.train(
      resume_from_checkpoint=d)`` works.

    Only this model object is affected. Returns ``model`` itself.
    """
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise TypeError(
            f"attach_hf_checkpointing: `model` must be a Hugging Face model with a save_pretrained method, got "
            f"{type(model).__name__}"
        )
    model.save_pretrained = _SavePretrained(model)
    if not model.__dict__.get("_resu_keeps_own_export"):
        handle = model.register_load_state_dict_pre_hook(_keep_own_export)
        # Before the load checks that resu.sparsify_ registers: those refuse a plain tensor for a RESU
        # weight, and this hook is what turns the model's own export back into its parameters.
        model._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)
        model._resu_keeps_own_export = True
    return model
