"""Behaviour at the edges: writes through the parameter, double backward, odd layers, optimizer identity."""


import pytest
import torch
import torch.nn as nn

import resu
from tests.helpers import model_in_mode


def test_double_backward_is_refused_clearly():
    model = model_in_mode("sparse")
    x = torch.randn(4, 12, requires_grad=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)


def test_item_assignment_keeps_sparse_invariant_and_is_refused_in_resu():
    model = model_in_mode("sparse")
    p = model[0].weight
    active = p.active_mask
    with torch.no_grad():
        p[0] = 3.0
    w = p.effective_weight()
    assert torch.all(w[~active] == 0)
    assert torch.all(w[0][active[0]] == 3.0)
    resu.enter_resu_(model)
    before = p.effective_weight().clone()
    with torch.no_grad(), pytest.raises(RuntimeError, match="RESU mode"):
        p[0] = 1.0
    assert torch.equal(p.effective_weight(), before)


def test_data_assignment():
    dense = model_in_mode("dense")
    new = torch.randn(20, 12)
    dense[0].weight.data = new
    assert torch.equal(dense[0].weight.effective_weight(), new)
    sparse = model_in_mode("sparse")
    p = sparse[0].weight
    p.data = new
    assert torch.equal(p.effective_weight()[p.active_mask], new[p.active_mask])
    assert torch.all(p.effective_weight()[~p.active_mask] == 0)
    with pytest.raises(RuntimeError, match="shape"):
        p.data = torch.randn(3, 3)
    resu.enter_resu_(sparse)
    with pytest.raises(RuntimeError, match="RESU mode"):
        p.data = new
    # vector_to_parameters goes through .data
    v = torch.nn.utils.parameters_to_vector(dense.parameters())
    torch.nn.utils.vector_to_parameters(v * 2, dense.parameters())
    assert torch.equal(dense[0].weight.effective_weight(), new * 2)


def test_compact_grad_arithmetic_with_scalars_and_dense_tensors_is_dense_and_correct():
    model = model_in_mode("resu")
    model(torch.randn(4, 12)).sum().backward()
    g = model[0].weight.grad
    d = g.to_dense()
    other = torch.randn_like(d)
    assert torch.equal(g + 1, d + 1)
    assert torch.equal(g - other, d - other)
    assert torch.equal(g + g, (d + d))
    assert torch.linalg.vector_norm(g, 2, None, True).shape == (1, 1)
    assert torch._foreach_norm([g], 2, dtype=torch.float64)[0].dtype == torch.float64
    a = torch.ones_like(d)
    a.copy_(g)
    assert torch.equal(a, d)
    b = other.clone()
    b.mul_(g)
    assert torch.equal(b, other * d)


def test_optimizer_built_before_sparsify_trains_the_converted_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    p = model[0].weight
    w0 = p.effective_weight().clone()
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(p.effective_weight()[p.active_mask], w0[p.active_mask])
    assert torch.all(p.effective_weight()[~p.active_mask] == 0)


def test_torch_adamw_state_loads_into_resu_adamw_after_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    stock = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    stock.step()
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    opt = resu.ResuAdamW(model.parameters())
    opt.load_state_dict(stock.state_dict())
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["exp_avg"].shape == (24,)


def test_parametrized_and_lazy_linears_are_skipped_with_a_warning():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 4), nn.LazyLinear(3))
    with pytest.warns(UserWarning, match="not a plain registered parameter"):
        resu.sparsify_(model)
    assert isinstance(model[1].weight, resu.ResuParameter)
    assert not isinstance(model[2].weight, resu.ResuParameter)
    assert model(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_zero_size_linear(shape):
    layer = resu.sparsify_(nn.Linear(*shape))
    resu.prune_(layer, 0.5)
    resu.enter_resu_(layer)
    x = torch.randn(3, shape[0], requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape


def test_loading_a_plain_tensor_into_a_resu_weight_explains_itself():
    model = model_in_mode("resu")
    plain = {k: (v.effective_weight() if isinstance(v, resu.ResuParameter) else v) for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="enter_resu_"):
        model.load_state_dict(plain)


def test_weights_used_inside_composite_functionals_still_get_compact_grads():
    """nn.MultiheadAttention calls linear on out_proj.weight inside F.multi_head_attention_forward."""
    torch.manual_seed(0)
    mha = resu.sparsify_(nn.MultiheadAttention(16, 2, batch_first=True))
    resu.prune_(mha, 0.5)
    resu.enter_resu_(mha)
    w = mha.out_proj.weight
    x = torch.randn(2, 5, 16)
    mha(x, x, x)[0].sum().backward()
    assert isinstance(w.grad, resu.CompactGrad) and w.grad.values.numel() == w.n_pruned
    ref = nn.MultiheadAttention(16, 2, batch_first=True)
    ref.load_state_dict({k: (v.effective_weight() if isinstance(v, resu.ResuParameter) else v) for k, v in mha.state_dict().items()})
    ref(x, x, x)[0].sum().backward()
    torch.testing.assert_close(w.grad.values, ref.out_proj.weight.grad[~w.active_mask])
