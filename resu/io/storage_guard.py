"""A ResuParameter has no single dense storage: code that asks for one gets an error that says what to call.

safetensors (``save_model``), Hugging Face ``save_pretrained`` and other serializers find tied
weights by storage pointer. A wrapper tensor subclass has no storage of its own, so torch answers
"Attempted to access the data pointer on an invalid python storage" from deep inside them. They ask
``untyped_storage()`` first and fall back to the legacy ``Tensor.storage()``; that fallback is caught
here and raises a ValueError naming the two functions that save a sparsified model.
"""

from __future__ import annotations

import torch

from resu.tensors.resu_parameter import TORCH_FUNCTIONS, ResuParameter, run_without_subclass

SAVE_HINT = (
    "save it with resu.save_safetensors(model, path) (every mode, restored exactly by resu.load_safetensors_), "
    "or for a Hugging Face model with resu.save_pretrained(model, directory) (ordinary dense weights that plain "
    "transformers loads, plus resu's layout beside them); torch.save(model.state_dict()) also works"
)


@TORCH_FUNCTIONS.implements(torch.Tensor.storage)
def _no_dense_storage(func, args, kwargs):
    p = args[0]
    if not isinstance(p, ResuParameter):
        return run_without_subclass(func, args, kwargs)
    raise ValueError(
        f"a ResuParameter ({tuple(p.shape)}, {p.mode.value} mode) has no single dense storage, so this serializer "
        f"cannot write it: {SAVE_HINT}"
    )
