"""torch.compile(fullgraph=True) in every mode, and training as usual: AMP, accumulation, clipping, checkpointing."""

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import resu
from resu.tensors.compact_grad import CompactGrad
from tests.helpers import model_in_mode

MODES = ["dense", "sparse", "resu"]


def _grad_of(p):
    return p.grad.to_dense() if isinstance(p.grad, CompactGrad) else p.grad


@pytest.mark.parametrize("mode", MODES)
def test_fullgraph_compile_matches_eager(mode):
    model = model_in_mode(mode)
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    eager_out = model(x)
    nn.functional.cross_entropy(eager_out, y).backward()
    eager_grads = [_grad_of(p).clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    torch.testing.assert_close(out, eager_out)
    nn.functional.cross_entropy(out, y).backward()
    for p, g in zip(model.parameters(), eager_grads):
        assert type(p.grad) is type(g) or isinstance(p.grad, CompactGrad)
        torch.testing.assert_close(_grad_of(p), g)


def test_compiled_model_follows_mode_changes():
    """One compiled module across DENSE → SPARSE → RESU → DENSE: it recompiles, never runs stale code."""
    torch.manual_seed(0)
    model = resu.sparsify_(nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 5)))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 12)
    for step in ("dense", "prune", "resu", "commit"):
        if step == "prune":
            resu.prune_(model, 0.5)
        elif step == "resu":
            resu.enter_resu_(model, epsilon=1.0)
        elif step == "commit":
            resu.exit_resu_(model, commit=True)
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
        out.sum().backward()
        grad = model[0].weight.grad
        assert isinstance(grad, CompactGrad) == (step == "resu")
        model.zero_grad()


def test_training_step_amp_accumulation_clipping_compiled():
    model = model_in_mode("resu")
    rps = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    frozen = [(p.effective_weight().clone(), p.active_mask) for p in rps]
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        for _micro in range(2):  # gradient accumulation
            x, y = torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(compiled(x).float(), y) / 2
            loss.backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        assert torch.isfinite(norm)
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses)))
    for p, (w0, active) in zip(rps, frozen):
        assert torch.equal(p.effective_weight()[active], w0[active])
        assert not torch.equal(p.effective_weight()[~active], w0[~active])


class _CheckpointedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = ckpt.checkpoint(self.inner, x, use_reentrant=False)
        return self.head(h)


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing(compiled):
    torch.manual_seed(0)
    model = resu.sparsify_(_CheckpointedMLP())
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, epsilon=0.5)
    x = torch.randn(6, 12)
    ref_model = _CheckpointedMLP()
    ref_model.load_state_dict({k: (v.effective_weight() if isinstance(v, resu.ResuParameter) else v) for k, v in model.state_dict().items()})
    run = torch.compile(model, fullgraph=True) if compiled else model
    run(x).sum().backward()
    ref_model(x).sum().backward()
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        if isinstance(p, resu.ResuParameter):
            torch.testing.assert_close(p.grad.values, r.grad[~p.active_mask], msg=name)
        else:
            torch.testing.assert_close(p.grad, r.grad, msg=name)


def test_bf16_weights_train_in_resu_mode():
    model = model_in_mode("resu", dtype=torch.bfloat16)
    p = model[0].weight
    assert p.dtype == torch.bfloat16 and p.effective_weight().dtype == torch.bfloat16
    active = p.active_mask
    w0 = p.effective_weight().clone()
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        opt.zero_grad()
        compiled(torch.randn(8, 12, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
    assert p.grad.dtype == torch.bfloat16
    assert torch.equal(p.effective_weight()[active], w0[active])
    assert not torch.equal(p.effective_weight()[~active], w0[~active])


@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_training_steps_reuse_one_graph_without_recompiling(mode):
    """Optimizer steps change values, never layouts: a compiled layer keeps its one graph (a recompile per
    step would put compilation into every step's time)."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    resu.sparsify_(layer)
    resu.prune_(layer, 0.5)
    if mode == "resu":
        resu.enter_resu_(layer)
    elif mode == "qresu":
        resu.enter_qresu_(layer, bits=4, scheme="per_group", group_size=16)
    opt = resu.ResuAdamW(layer.parameters(), lr=1e-2)
    compiled = torch.compile(layer, fullgraph=True)
    before = layer.weight.effective_weight().clone()
    for _ in range(4):
        x = torch.randn(8, 32, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.weight.effective_weight(), before)  # the steps did train
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
