"""Copies of a RESU model train exactly like the original: deepcopy, ``.to()``, pickling, ``to_empty``.

The weight is used both through ``F.linear`` (compact θ gradient) and as ``x @ W.t()`` (a dense
gradient, reduced to its θ part by a post-accumulate-grad hook). Hooks are not copied with a tensor,
so each copy must register its own; without it the clip norm includes the frozen slots' gradient.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter


class TwoWays(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 7)

    def forward(self, x):
        return F.linear(x, self.fc.weight, self.fc.bias) + x @ self.fc.weight.t()


def _resu_model(mode: str = "resu") -> nn.Module:
    torch.manual_seed(0)
    model = resu.sparsify_(TwoWays())
    resu.prune_(model, 0.5)
    gen = torch.Generator().manual_seed(3)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=gen)
    else:
        resu.enter_qresu_(model, bits=8, scheme="per_channel", epsilon=0.5, generator=gen)
    return model


def _one_step(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    opt = resu.ResuAdamW(model.parameters(), lr=0.05)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(11))
    model(x).square().sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return norm, model.fc.weight.effective_weight().clone()


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "to_float64_and_back": lambda m: copy.deepcopy(m).to(torch.float64).to(torch.float32),
    "to_same_device": lambda m: copy.deepcopy(m).to("cpu"),
    "pickle": _pickled,
}


@pytest.mark.parametrize("mode", ["resu", "qresu"])
@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_takes_the_same_step_as_the_original(mode, how):
    original = _resu_model(mode)
    copied = COPIES[how](original)
    assert isinstance(copied.fc.weight, ResuParameter) and copied.fc.weight.mode is original.fc.weight.mode
    norm_copy, w_copy = _one_step(copied)
    norm, w = _one_step(original)
    assert torch.equal(norm_copy, norm)
    assert torch.equal(w_copy, w)


def test_the_reproducer_gradient_is_reduced_to_theta_in_the_copy():
    copied = copy.deepcopy(_resu_model())
    x = torch.randn(5, 10)
    copied(x).sum().backward()
    assert isinstance(copied.fc.weight.grad, resu.tensors.compact_grad.CompactGrad)


def test_copying_twice_registers_the_hook_once():
    p = copy.deepcopy(copy.deepcopy(_resu_model())).fc.weight
    hooks = [h for h in p._post_accumulate_grad_hooks.values() if h.__name__ == "compact_foreign_grad"]
    assert len(hooks) == 1


def test_to_empty_after_a_meta_sparsify_keeps_resu_parameters():
    torch.manual_seed(0)
    source = resu.sparsify_(nn.Sequential(nn.Linear(10, 7)))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(10, 7))
    resu.sparsify_(meta)
    meta.to_empty(device="cpu")
    assert isinstance(meta[0].weight, ResuParameter) and meta[0].weight.device.type == "cpu"
    meta.load_state_dict(source.state_dict())
    assert torch.equal(meta[0].weight.effective_weight(), source[0].weight.effective_weight())


def test_to_empty_keeps_a_real_mask():
    model = _resu_model()
    mask = model.fc.weight._mask_storage.clone()
    model.to_empty(device="cpu")
    p = model.fc.weight
    assert isinstance(p, ResuParameter) and p.mode is ResuMode.RESU
    assert torch.equal(p._mask_storage, mask)


def test_to_empty_of_a_masked_weight_on_meta_is_refused_with_a_clear_message():
    model = _resu_model().to("meta")
    assert isinstance(model.fc.weight, ResuParameter) and model.fc.weight.device.type == "meta"
    with pytest.raises(RuntimeError, match="mask has no data"):
        model.to_empty(device="cpu")
