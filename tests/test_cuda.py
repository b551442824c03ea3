"""CUDA paths against their CPU references (run with ``pytest -m cuda`` on a GPU machine)."""

import pytest
import torch
import torch.nn as nn

import resu
from resu.tensors.compact_grad import CompactGrad
from tests.helpers import model_in_mode

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "qresu"])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_matches_cpu_reference(mode, compiled):
    cpu = model_in_mode(mode, sparsity=0.6)
    gpu = model_in_mode(mode, sparsity=0.6).cuda()
    assert all(type(a) is type(b) for a, b in zip(cpu.parameters(), gpu.parameters()))
    run = torch.compile(gpu, fullgraph=True) if compiled else gpu
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    out = run(x.cuda())
    torch.testing.assert_close(out.cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    nn.functional.cross_entropy(out, y.cuda()).backward()
    nn.functional.cross_entropy(cpu(x), y).backward()
    for a, b in zip(gpu.parameters(), cpu.parameters()):
        ga = a.grad.to_dense() if isinstance(a.grad, CompactGrad) else a.grad
        gb = b.grad.to_dense() if isinstance(b.grad, CompactGrad) else b.grad
        torch.testing.assert_close(ga.cpu(), gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_training_keeps_active_frozen(dtype):
    model = model_in_mode("resu").cuda()
    p = model[0].weight
    active = p.active_mask
    w0 = p.effective_weight().clone()
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = nn.functional.cross_entropy(compiled(torch.randn(8, 12, device="cuda")), torch.randint(0, 5, (8,), device="cuda"))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    assert torch.equal(p.effective_weight()[active], w0[active])
    assert not torch.equal(p.effective_weight()[~active], w0[~active])


def test_cuda_resu_adamw_matches_cpu():
    cpu = model_in_mode("resu")
    gpu = model_in_mode("resu").cuda()
    opts = [resu.ResuAdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (cpu, gpu)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 12, generator=g)
        for m, o, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            o.zero_grad()
            m(x.to(dev)).pow(2).mean().backward()
            o.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b
        torch.testing.assert_close(wb.detach().cpu(), wa.detach(), rtol=1e-5, atol=1e-6)


def test_cuda_optimizer_follows_mask_changes_like_cpu():
    """SPARSE steps, then RESU steps, then a re-prune: the CUDA kernels' cached mask data never goes stale."""
    models = [model_in_mode("sparse", sparsity=0.5), model_in_mode("sparse", sparsity=0.5).cuda()]
    opts = [resu.ResuAdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    g = torch.Generator().manual_seed(1)

    def steps(n):
        for _ in range(n):
            x = torch.randn(8, 12, generator=g)
            for m, o, dev in zip(models, opts, ("cpu", "cuda")):
                o.zero_grad()
                m(x.to(dev)).pow(2).mean().backward()
                o.step()

    steps(2)
    for m in models:
        resu.enter_resu_(m, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    steps(2)
    for m in models:
        resu.exit_resu_(m, commit=True)
        resu.prune_(m, 0.3, method="random", generator=torch.Generator().manual_seed(5))
    steps(2)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b
        torch.testing.assert_close(wb.detach().cpu(), wa.detach(), rtol=1e-4, atol=1e-5)


def test_cuda_foreign_dense_gradient_becomes_compact():
    """A RESU weight used by x @ W.t() gets a dense aten gradient; the hook gathers its θ part on the GPU."""
    model = model_in_mode("sparse").cuda()
    resu.enter_resu_(model)  # after the move: the hook is registered on entering RESU
    p = model[0].weight
    x = torch.randn(4, 12, device="cuda")
    (x @ p.t()).sum().backward()
    assert isinstance(p.grad, CompactGrad)
    w = p.effective_weight().clone().requires_grad_(True)
    (x @ w.t()).sum().backward()
    torch.testing.assert_close(p.grad.values, w.grad[~p.active_mask])


@pytest.mark.parametrize("mode", ["resu", "qresu"])
def test_cuda_theta_training_matches_cpu(mode):
    """Triton paths (dequant+merge, θ gather, optimizer) on the GPU vs the references on the CPU, 3 steps."""
    models = [model_in_mode(mode, sparsity=0.4, seed=5), model_in_mode(mode, sparsity=0.4, seed=5).cuda()]
    opts = [resu.ResuAdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(16, 12, generator=g)
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x.to(next(m.parameters()).device)).pow(2).mean().backward()
            o.step()
    for a, b in zip(*(m.parameters() for m in models)):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a.detach()
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b.detach()
        torch.testing.assert_close(wb.cpu(), wa, rtol=1e-4, atol=1e-5)
