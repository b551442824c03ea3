"""state_dict round trips: torch.save / torch.load(weights_only=True) into a freshly sparsified model."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import resu
from tests.helpers import mlp, model_in_mode


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mode", ["dense", "sparse", "resu"])
@pytest.mark.parametrize("sparsity", [0.02, 0.5, 0.99])  # all three mask encodings
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_into_fresh_model_reproduces_outputs_exactly(mode, sparsity, dtype):
    model = model_in_mode(mode, sparsity=sparsity, dtype=dtype)
    sd = _roundtrip(model.state_dict())
    fresh = resu.sparsify_(mlp(seed=123, dtype=dtype))
    fresh.load_state_dict(sd)
    x = torch.randn(9, 12, dtype=dtype)
    assert torch.equal(fresh(x), model(x))
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        if isinstance(a, resu.ResuParameter):
            assert b.mode is a.mode, n
            assert torch.equal(b.active_mask, a.active_mask), n
            assert b.mask_nbytes == a.mask_nbytes, n


def test_resumed_training_matches_uninterrupted_bitwise():
    model = model_in_mode("resu")
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(6)]

    def train(m, o, bs):
        for x, y in bs:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    train(model, opt, batches[:3])
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, batches[3:])

    fresh = resu.sparsify_(mlp(seed=99))
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = resu.ResuAdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(ckpt["opt"])
    train(fresh, fresh_opt, batches[3:])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b
        assert torch.equal(wa, wb)


def test_loading_a_plain_dense_checkpoint_into_a_sparse_model_keeps_pruned_slots_zero():
    model = model_in_mode("sparse", sparsity=0.5)
    active = model[0].weight.active_mask
    dense_sd = mlp(seed=5).state_dict()
    model.load_state_dict(dense_sd)
    w = model[0].weight.effective_weight()
    assert torch.all(w[~active] == 0)
    assert torch.equal(w[active], dense_sd["0.weight"][active])


def test_deepcopy_and_clone_keep_everything():
    model = model_in_mode("resu")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 12)
    assert torch.equal(twin(x), model(x))
    p, q = model[0].weight, twin[0].weight
    assert type(q) is type(p) and q.mode is p.mode
    assert q.effective_weight().data_ptr() != p.effective_weight().data_ptr()
    c = p.clone()
    assert type(c) is resu.ResuParameter and torch.equal(c.active_mask, p.active_mask)


def test_model_to_dtype_keeps_subclass_and_mask():
    model = model_in_mode("resu")
    p0 = model[0].weight
    active = p0.active_mask.clone()
    model.to(torch.bfloat16)
    p = model[0].weight
    assert isinstance(p, resu.ResuParameter) and p.dtype == torch.bfloat16 and p.mode is resu.ResuMode.RESU
    assert torch.equal(p.active_mask, active)
    assert model(torch.randn(3, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_whole_model_pickle_keeps_parameters():
    model = model_in_mode("resu")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    p = loaded[0].weight
    assert isinstance(p, resu.ResuParameter) and isinstance(p, nn.Parameter) and p.requires_grad
    x = torch.randn(3, 12)
    assert torch.equal(loaded(x), model(x))
