"""ResuAdamW's multi-tensor path for plain parameters (taken on CUDA; forced here on the CPU): the
same numbers as ``torch.optim.AdamW(foreach=True)``, with or without ``fused=True``; ResuParameters
never go through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import adamw as torch_adamw

import resu
from resu.optim import resu_adamw


@pytest.mark.parametrize("fused", [None, True])
def test_plain_parameters_step_as_torch_multi_tensor_adamw(monkeypatch, fused):
    monkeypatch.setattr(resu_adamw, "_multi_tensor_ready", lambda p, grad: type(p) is nn.Parameter)
    batches = []
    real = torch_adamw.adamw
    monkeypatch.setattr(torch_adamw, "adamw", lambda *a, **k: batches.append((list(a[0]), k["foreach"], k["fused"])) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3))
    resu.sparsify_(model, filter_fn=lambda name, module: name == "2")
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, epsilon=0.1)
    plain = [p for p in model.parameters() if not isinstance(p, resu.ResuParameter)]
    copies = [nn.Parameter(p.detach().clone()) for p in plain]
    sparse = model[2].weight
    active_before = sparse.effective_weight()[sparse.active_mask].clone()
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    # ``fused`` is ignored for plain parameters (torch's fused kernel wants the step counter on the
    # parameter's device; ResuAdamW keeps it on the CPU, as for every other state): always foreach.
    want = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        F.mse_loss(model(torch.randn(5, 6, generator=g)), torch.randn(5, 3, generator=g)).backward()
        for c, p in zip(copies, plain):
            c.grad = p.grad.clone()
        opt.step()
        want.step()
        opt.zero_grad()
    # one call per step, plain parameters only, torch's foreach path (its fused kernel would want the
    # step counters on the parameters' device)
    assert len(batches) == 3 and all(b == (plain, True, None) for b in batches)
    assert all(state["step"].device.type == "cpu" for state in opt.state.values())
    for c, p in zip(copies, plain):
        assert torch.equal(c.detach(), p.detach())
    assert torch.equal(sparse.effective_weight()[sparse.active_mask], active_before)
    assert not torch.equal(sparse.effective_weight()[~sparse.active_mask], torch.zeros(int((~sparse.active_mask).sum())))


def test_foreach_false_keeps_one_parameter_at_a_time(monkeypatch):
    monkeypatch.setattr(resu_adamw, "_multi_tensor_ready", lambda p, grad: True)
    monkeypatch.setattr(torch_adamw, "adamw", lambda *a, **k: pytest.fail("multi-tensor path taken"))
    layer = nn.Linear(4, 2)
    opt = resu.ResuAdamW(layer.parameters(), lr=1e-2, foreach=False)
    layer(torch.randn(3, 4)).sum().backward()
    opt.step()
