"""Hypothesis properties over random shapes, sparsities (both ends included), dtypes, compile on/off."""

import io

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import resu
from resu.tensors.compact_grad import CompactGrad

dims = st.integers(1, 64)
sparsities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, allow_nan=False))
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def _resu_layer(in_f, out_f, sparsity, dtype, seed):
    torch.manual_seed(seed)
    layer = resu.sparsify_(nn.Linear(in_f, out_f).to(dtype))
    resu.prune_(layer, sparsity, scope="global")
    resu.enter_resu_(layer, epsilon=0.5, generator=torch.Generator().manual_seed(seed))
    return layer


def _train(layer, opt, in_f, steps, compiled, dtype, seed):
    run = torch.compile(layer, fullgraph=True) if compiled else layer
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, in_f, generator=g).to(dtype)
        run(x).float().pow(2).mean().backward()
        opt.step()


def _check_frozen_and_moved(in_f, out_f, sparsity, dtype, seed, compiled):
    layer = _resu_layer(in_f, out_f, sparsity, dtype, seed)
    p = layer.weight
    active = p.active_mask
    w0 = p.effective_weight().clone()
    opt = resu.ResuAdamW(layer.parameters(), lr=5e-2, weight_decay=0.3)
    _train(layer, opt, in_f, 3, compiled, dtype, seed)
    w1 = p.effective_weight()
    assert torch.equal(w1[active], w0[active])
    if p.n_pruned:
        assert not torch.equal(w1[~active], w0[~active])
        assert opt.state[p]["exp_avg"].numel() == p.n_pruned


@given(in_f=dims, out_f=dims, sparsity=sparsities, dtype=dtypes, seed=st.integers(0, 2**16))
def test_active_slots_bitwise_frozen_theta_moves(in_f, out_f, sparsity, dtype, seed):
    _check_frozen_and_moved(in_f, out_f, sparsity, dtype, seed, compiled=False)


@settings(max_examples=4)
@given(in_f=dims, out_f=dims, sparsity=sparsities, dtype=dtypes, seed=st.integers(0, 2**16))
def test_active_slots_bitwise_frozen_theta_moves_compiled(in_f, out_f, sparsity, dtype, seed):
    torch._dynamo.reset()
    _check_frozen_and_moved(in_f, out_f, sparsity, dtype, seed, compiled=True)


@given(in_f=dims, out_f=dims, sparsity=sparsities, seed=st.integers(0, 2**16))
def test_gradient_isolation(in_f, out_f, sparsity, seed):
    layer = _resu_layer(in_f, out_f, sparsity, torch.float32, seed)
    p = layer.weight
    x = torch.randn(7, in_f, generator=torch.Generator().manual_seed(seed))
    layer(x).pow(2).sum().backward()
    ref_w = p.effective_weight().clone().requires_grad_(True)
    nn.functional.linear(x, ref_w, layer.bias.detach()).pow(2).sum().backward()
    active = p.active_mask
    g_p = p.grad.to_dense()
    g_a = torch.where(active, ref_w.grad, 0)
    assert isinstance(p.grad, CompactGrad) and p.grad.values.numel() == p.n_pruned
    assert torch.dot(g_a.flatten(), g_p.flatten()).item() == 0.0
    torch.testing.assert_close(g_p[~active], ref_w.grad[~active])


@given(in_f=dims, out_f=dims, sparsity=sparsities, dtype=dtypes, seed=st.integers(0, 2**16),
       mode=st.sampled_from(["dense", "sparse", "resu"]))
def test_state_dict_round_trip(in_f, out_f, sparsity, dtype, seed, mode):
    layer = _resu_layer(in_f, out_f, sparsity, dtype, seed)
    if mode != "resu":
        resu.exit_resu_(layer, commit=(mode == "dense"))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = resu.sparsify_(nn.Linear(in_f, out_f).to(dtype))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.weight.mode.value == mode
    assert torch.equal(fresh.weight.effective_weight(), layer.weight.effective_weight())
    assert torch.equal(fresh.weight.active_mask, layer.weight.active_mask)
    x = torch.randn(3, in_f).to(dtype)
    assert torch.equal(fresh(x), layer(x))


@given(in_f=dims, out_f=dims, sparsity=sparsities)
def test_mask_bytes_are_the_adaptive_minimum(in_f, out_f, sparsity):
    layer = resu.sparsify_(nn.Linear(in_f, out_f))
    resu.prune_(layer, sparsity, scope="global")
    n, p = in_f * out_f, layer.weight.n_pruned
    assert layer.weight.mask_nbytes == min(4 * p, 4 * (n - p), (n + 7) // 8)
