"""CompactGrad meets what training does to gradients: accumulation, clipping, zeroing, AMP unscale."""

import pytest
import torch
import torch.nn as nn

from resu.tensors.compact_grad import CompactGrad
from tests.helpers import model_in_mode


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _backward(model, x, y):
    nn.functional.cross_entropy(model(x), y).backward()


def test_grad_accumulation_equals_sum_of_separate_grads():
    model = model_in_mode("resu")
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    _backward(model, x[:8], y[:8])
    first = {n: (g.values.clone() if isinstance(g, CompactGrad) else g.clone()) for n, g in _grads(model).items()}
    model.zero_grad()
    _backward(model, x[8:], y[8:])
    second = {n: (g.values.clone() if isinstance(g, CompactGrad) else g.clone()) for n, g in _grads(model).items()}
    model.zero_grad()
    _backward(model, x[:8], y[:8])
    _backward(model, x[8:], y[8:])
    for n, g in _grads(model).items():
        got = g.values if isinstance(g, CompactGrad) else g
        torch.testing.assert_close(got, first[n] + second[n])


def test_clip_grad_norm_matches_dense_reference():
    model = model_in_mode("resu")
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    _backward(model, x, y)
    dense = [p.grad.to_dense() if isinstance(p.grad, CompactGrad) else p.grad.clone() for p in model.parameters()]
    ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dense]))
    max_norm = float(ref_norm) / 3
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(total, ref_norm)
    for p, d in zip(model.parameters(), dense):
        got = p.grad.to_dense() if isinstance(p.grad, CompactGrad) else p.grad
        torch.testing.assert_close(got, d * (max_norm / (float(ref_norm) + 1e-6)))


@pytest.mark.parametrize("foreach", [True, False])
def test_foreach_ops_on_compact_grads(foreach):
    model = model_in_mode("resu")
    _backward(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    grads = [p.grad for p in model.parameters()]
    before = [g.to_dense().clone() if isinstance(g, CompactGrad) else g.clone() for g in grads]
    norms = torch._foreach_norm(grads, 2)
    for n, b in zip(norms, before):
        torch.testing.assert_close(n, torch.linalg.vector_norm(b))
    torch._foreach_mul_(grads, 0.5)
    for g, b in zip(grads, before):
        got = g.to_dense() if isinstance(g, CompactGrad) else g
        torch.testing.assert_close(got, b * 0.5)
    model.zero_grad(set_to_none=False)
    for g in grads:
        assert torch.count_nonzero(g.to_dense() if isinstance(g, CompactGrad) else g) == 0


def test_amp_unscale_on_compact_grad():
    model = model_in_mode("resu")
    _backward(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    g = model[0].weight.grad
    before = g.values.clone()
    found_inf = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_([g], found_inf, torch.tensor(0.25))
    torch.testing.assert_close(g.values, before * 0.25)
    assert found_inf.item() == 0
    g.values[0] = float("inf")
    torch._amp_foreach_non_finite_check_and_unscale_([g], found_inf, torch.tensor(1.0))
    assert found_inf.item() == 1


def test_gradients_from_other_ops_fold_in_as_their_theta_part():
    """A gradient from outside resu's linear path (x @ W.t()) keeps its θ part only, alone or accumulated."""
    model = model_in_mode("resu")
    p = model[0].weight
    active = p.active_mask
    x = torch.randn(4, 12)
    w = p.effective_weight().clone().requires_grad_(True)
    (x @ w.t()).sum().backward()
    dense = w.grad

    (x @ p.t()).sum().backward()  # aten path alone
    assert isinstance(p.grad, CompactGrad)
    torch.testing.assert_close(p.grad.values, dense[~active])
    model[0](x).sum().backward()  # resu path accumulated onto it
    torch.testing.assert_close(p.grad.values, 2 * dense[~active])
    (x @ p.t()).sum().backward()  # aten path accumulated onto a compact gradient
    assert isinstance(p.grad, CompactGrad)
    torch.testing.assert_close(p.grad.values, 3 * dense[~active])


def test_dense_add_inplace_of_compact_touches_theta_slots_only():
    model = model_in_mode("resu")
    model(torch.randn(4, 12)).sum().backward()
    g = model[0].weight.grad
    base = torch.randn(g.shape)
    out = base.clone()
    out.add_(g)
    torch.testing.assert_close(out, base + g.to_dense())


def test_unsupported_inplace_op_on_compact_grad_raises():
    model = model_in_mode("resu")
    _backward(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    with pytest.raises(RuntimeError, match="ResuAdamW"):
        model[0].weight.grad.exp_()


def test_out_of_place_unhandled_op_uses_dense_gradient():
    model = model_in_mode("resu")
    _backward(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    g = model[0].weight.grad
    torch.testing.assert_close(torch.abs(g), g.to_dense().abs())
    assert torch.isfinite(g).all()
