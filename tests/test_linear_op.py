"""resu::linear against the dense reference: outputs and gradients in every mode, eager."""

import pytest
import torch
import torch.nn.functional as F

import resu
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.resu_parameter import ResuParameter

MODES = ["dense", "sparse", "resu"]


def make_param(mode, shape=(7, 9), sparsity=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    p = ResuParameter.from_weight(w, requires_grad=True)
    if mode != "dense":
        pruned = torch.rand(shape, generator=g) < sparsity
        p._apply_pruning_(pruned)
    if mode == "resu":
        p._enter_resu_(torch.randn(p.n_pruned, generator=g))
    return p


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_shape", [(5, 9), (2, 3, 9), (9,)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_dense_reference(mode, x_shape, bias):
    p = make_param(mode)
    ref_w = p.effective_weight().clone().requires_grad_(True)
    b = torch.randn(7, requires_grad=True) if bias else None
    x = torch.randn(x_shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True) if bias else None

    out = F.linear(x, p, b)
    ref = F.linear(x_ref, ref_w, b_ref)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad)

    active = p.active_mask
    if mode == "dense":
        assert type(p.grad) is torch.Tensor
        torch.testing.assert_close(p.grad, ref_w.grad)
    elif mode == "sparse":
        # trainable slots = active: pruned slots get exactly zero gradient
        assert type(p.grad) is torch.Tensor
        torch.testing.assert_close(p.grad[active], ref_w.grad[active])
        assert torch.all(p.grad[~active] == 0)
    else:
        # RESU: compact gradient, θ slots only; active slots have no gradient at all
        assert isinstance(p.grad, CompactGrad)
        assert p.grad.values.shape == (p.n_pruned,)
        torch.testing.assert_close(p.grad.values, ref_w.grad[~active])
        dense = p.grad.to_dense()
        assert torch.all(dense[active] == 0)
        torch.testing.assert_close(dense[~active], ref_w.grad[~active])


def test_gradient_isolation_inner_product_is_zero():
    p = make_param("resu", shape=(16, 24), sparsity=0.5)
    x = torch.randn(10, 24)
    F.linear(x, p).pow(2).sum().backward()
    g_p = p.grad.to_dense()
    # the full gradient a dense layer would get, split into active and pruned parts
    w = p.effective_weight().clone().requires_grad_(True)
    F.linear(x, w).pow(2).sum().backward()
    active = p.active_mask
    g_a = torch.where(active, w.grad, 0)
    assert torch.dot(g_a.flatten(), g_p.flatten()) == 0
    assert torch.count_nonzero(g_p[active]) == 0
    assert torch.count_nonzero(g_p[~active]) > 0


def test_direct_matmul_on_resu_weight_goes_through_effective_weight():
    """Ops other than F.linear see the effective weight (correct, never silently wrong)."""
    p = make_param("resu")
    x = torch.randn(4, 9)
    ref = x @ p.effective_weight().t()
    torch.testing.assert_close(x @ p.t(), ref)
    torch.testing.assert_close(torch.mm(x, p.t()), ref)
    torch.testing.assert_close(p.sum(), p.effective_weight().sum())
    torch.testing.assert_close(p * 2, p.effective_weight() * 2)


def test_autocast_bf16_cpu_matches_dense_autocast():
    p = make_param("resu", shape=(16, 32))
    w = p.effective_weight().clone().requires_grad_(True)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.linear(x, p)
        ref = F.linear(x, w)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    ref.float().sum().backward()
    assert p.grad.dtype == torch.float32
    torch.testing.assert_close(p.grad.values, w.grad[~p.active_mask])


def test_module_forward_hits_custom_op():
    model = resu.sparsify_(torch.nn.Linear(6, 3))
    x = torch.randn(2, 6)
    with torch.profiler.profile() as prof:
        model(x)
    names = {e.name for e in prof.events()}
    assert "resu::linear" in names
