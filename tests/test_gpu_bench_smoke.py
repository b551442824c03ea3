"""Smoke tests of benchmarks/gpu_model.py and benchmarks/gpu_optim.py: their CPU code paths (no timings)."""

import json
import sys
import types

import pytest
import torch

import resu
from tests.helpers import import_benchmarks


@pytest.fixture(scope="module")
def benches():
    return import_benchmarks("gpu_model", "gpu_optim")


def test_model_step_trains_theta_only_in_the_block_linears(benches):
    gpu_model, _ = benches
    cfg = gpu_model.SIZES["smoke"]
    model, opts = gpu_model.build(cfg, "resu:0.5", "cpu", compiled=False)
    weights = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    assert len(weights) == 7 * cfg.n_layers
    before = [(p._weight.clone(), p._mask_storage.clone()) for p in weights]
    head = model.head.weight.detach().clone()
    gpu_model.make_step(model, opts, cfg, "cpu")()
    for p, (w, _) in zip(weights, before):
        pruned = torch.zeros(p.numel(), dtype=torch.bool)
        pruned[p._pruned_indices()] = True
        changed = (p._weight != w).reshape(-1)
        assert changed.any()
        assert not (changed & ~pruned).any()  # active slots bitwise unchanged
    assert not torch.equal(model.head.weight.detach(), head)  # the rest trains with fused AdamW


@pytest.mark.parametrize("extras", ["+ib", "+ckpt+ib"])
def test_step_in_backward_and_checkpointed_modes_take_the_same_step(benches, extras):
    """``+ib``: the same optimizers' step, taken inside backward; ``+ckpt``: blocks recomputed in
    backward. Both bitwise the plain step on the CPU."""
    gpu_model, _ = benches
    cfg = gpu_model.SIZES["smoke"]
    plain, plain_opts = gpu_model.build(cfg, "qresu-pg128:0.3", "cpu", compiled=False)
    hooked, hooked_opts = gpu_model.build(cfg, "qresu-pg128:0.3" + extras, "cpu", compiled=False)
    assert all(isinstance(o, resu.optim.StepInBackward) for o in hooked_opts)
    assert hooked.checkpoint_blocks == ("ckpt" in extras)
    for model, opts in ((plain, plain_opts), (hooked, hooked_opts)):
        step = gpu_model.make_step(model, opts, cfg, "cpu")
        step()
        step()
    for p, q in zip(plain.parameters(), hooked.parameters()):
        inner = p._inner().items() if isinstance(p, resu.ResuParameter) else [("", p.detach())]
        other = dict(q._inner()) if isinstance(q, resu.ResuParameter) else {"": q.detach()}
        assert all(torch.equal(t, other[name]) for name, t in inner)
    assert all(p.grad is None for p in hooked.parameters())


def test_model_smoke_run_writes_rows_and_skips_qlora_without_torchao(benches, tmp_path, monkeypatch):
    gpu_model, _ = benches
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpu_model, "torchao_available", lambda: False)
    gpu_model.main(["--smoke", "--runs", "1", "--eager", "--modes", "qresu-pg128:0.5", "qlora"])
    rows = json.loads((tmp_path / "gpu_model_smoke.json").read_text())["results"]
    assert [(r["mode"], r["compiled"]) for r in rows] == [("dense", False), ("qresu-pg128:0.5", False), ("qlora", False)]
    assert all(r["ms"] > 0 and len(r["ms_all"]) == 2 for r in rows[:2])
    assert "torchao" in rows[2]["skipped"]


def test_qlora_mode_freezes_the_base_and_trains_the_adapters(benches, monkeypatch):
    """The QLoRA plumbing, with a stand-in for torchao's NF4 (a bf16 copy; torchao is optional here)."""
    gpu_model, _ = benches
    fake = types.ModuleType("torchao.dtypes.nf4tensor")
    fake.to_nf4 = lambda w: w.clone()
    fake.linear_nf4 = lambda x, w: torch.nn.functional.linear(x, w)
    for name in ("torchao", "torchao.dtypes"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torchao.dtypes.nf4tensor", fake)
    cfg = gpu_model.SIZES["smoke"]
    model, opts = gpu_model.build(cfg, "qlora", "cpu", compiled=False)
    block = model.blocks[0]
    assert isinstance(block.q, gpu_model.NF4LoRALinear) and not block.q.weight.requires_grad
    base = block.q.weight.detach().clone()
    lora_b = block.q.lora_b.detach().clone()
    gpu_model.make_step(model, opts, cfg, "cpu")()
    assert torch.equal(block.q.weight, base)  # the frozen base never moves
    assert not torch.equal(block.q.lora_b.detach(), lora_b)  # the adapter trains


def test_model_refuses_an_unknown_mode(benches):
    with pytest.raises(SystemExit, match="unknown mode"):
        benches[0].parse_mode("resu-0.5")


def test_optim_smoke_run_writes_every_row(benches, tmp_path, monkeypatch):
    _, gpu_optim = benches
    monkeypatch.chdir(tmp_path)
    gpu_optim.main(["--smoke", "--count", "3", "--iters", "1"])
    written = json.loads((tmp_path / "gpu_optim.json").read_text())
    kinds = [(r["kind"], r["count"]) for r in written["rows"]]
    assert ("selective-radix", 1) in kinds and ("resu-1by1", 3) in kinds and len(kinds) == 10
    assert [r["kind"] for r in written["selects"]] == ["select-topk", "select-radix"]
