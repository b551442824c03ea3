"""RESULinear's θ phases: RESU with stock optimizers, QRESU with a stock optimizer on θ, QRESU-Selective."""

import pytest
import torch
import torch.nn as nn

import resu
from resu.core.selective import SelectionConfig
from resu.modules.linear import RESUMode
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.layout import WritePolicy
from tests.test_seed_linear import IN, OUT, _gen, _hook_counts, _layer, _loss


# ---------------------------------------------------------------------- RESU with stock optimizers
def _resu_layer(seed=0, **kw):
    layer = _layer(seed)
    layer.prune_by_magnitude(0.5)
    layer.enter_resu_mode(epsilon=0.5, generator=_gen(seed), **kw)
    return layer


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
        lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.5),
    ],
)
def test_stock_optimizers_train_theta_and_leave_active_weights_bitwise_frozen(make_opt):
    layer = _resu_layer()
    active = layer.weight.active_mask.clone()
    w0 = layer.weight.effective_weight().clone()
    opt = make_opt([layer.weight])
    for step in range(3):
        opt.zero_grad()
        _loss(layer, step).backward()
        grad = layer.weight.grad
        assert type(grad) is torch.Tensor and grad.shape == w0.shape
        assert (grad[active] == 0).all() and grad[~active].abs().sum() > 0
        opt.step()
    w1 = layer.weight.effective_weight()
    assert torch.equal(w1[active], w0[active])
    assert not torch.equal(w1[~active], w0[~active])
    assert layer.weight.mode is resu.ResuMode.RESU


def test_stock_gradient_is_the_dense_form_of_the_compact_one_and_accumulates():
    stock, compact = _resu_layer(stock_optimizer=True), _resu_layer(stock_optimizer=False)
    for layer in (stock, compact):
        _loss(layer, 1).backward()
        _loss(layer, 2).backward()
    assert isinstance(compact.weight.grad, CompactGrad)
    torch.testing.assert_close(stock.weight.grad, compact.weight.grad.to_dense())


def test_resu_adamw_steps_a_stock_flagged_weight_as_it_steps_a_compact_one():
    stock, compact = _resu_layer(stock_optimizer=True), _resu_layer(stock_optimizer=False)
    opts = [resu.ResuAdamW([l.weight], lr=1e-2, weight_decay=0.1) for l in (stock, compact)]
    for step in range(3):
        for layer, opt in zip((stock, compact), opts):
            opt.zero_grad()
            _loss(layer, step).backward()
            opt.step()
    torch.testing.assert_close(stock.weight.effective_weight(), compact.weight.effective_weight())
    assert opts[0].state[stock.weight]["exp_avg"].shape == (stock.weight.n_pruned,)


def test_without_the_opt_in_stock_optimizers_and_writes_are_still_refused():
    plain = resu.sparsify_(nn.Sequential(nn.Linear(IN, OUT)))
    resu.prune_(plain, 0.5)
    resu.enter_resu_(plain, epsilon=0.5)
    for model, p in ((plain, plain[0].weight), (_resu_layer(stock_optimizer=False), None)):
        p = p if p is not None else model.weight
        before = p.effective_weight().clone()
        opt = torch.optim.Adam([p], lr=1e-2)
        model(torch.randn(4, IN)).sum().backward()
        with pytest.raises(RuntimeError, match="ResuAdamW"):
            opt.step()
        with pytest.raises(RuntimeError, match="RESU"):
            with torch.no_grad():
                p.mul_(2)
        assert torch.equal(p.effective_weight(), before)


def test_opted_in_weight_still_refuses_item_assignment_and_data_writes():
    layer = _resu_layer()
    before = layer.weight.effective_weight().clone()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="RESU"):
            layer.weight[0, 0] = 1.0
        with pytest.raises(RuntimeError, match="RESU"):
            layer.weight.data = torch.randn(OUT, IN)
        layer.weight.mul_(3.0)  # in-place ops pass, and only θ changes
    after = layer.weight.effective_weight()
    active = layer.weight.active_mask
    assert torch.equal(after[active], before[active])
    torch.testing.assert_close(after[~active], before[~active] * 3.0)


def test_stock_training_under_torch_compile_matches_eager():
    eager, compiled_layer = _resu_layer(), _resu_layer()
    compiled = torch.compile(compiled_layer, fullgraph=True)
    opts = [torch.optim.AdamW([l.weight], lr=1e-2, weight_decay=0.1) for l in (eager, compiled_layer)]
    active = eager.weight.active_mask
    w0 = eager.weight.effective_weight().clone()
    for step in range(2):
        x = torch.randn(5, IN, generator=_gen(step))
        for module, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            module(x).pow(2).mean().backward()
        torch.testing.assert_close(compiled_layer.weight.grad, eager.weight.grad)
        for opt in opts:
            opt.step()
    torch.testing.assert_close(compiled_layer.weight.effective_weight(), eager.weight.effective_weight())
    assert torch.equal(compiled_layer.weight.effective_weight()[active], w0[active])


@pytest.mark.parametrize("commit", [True, False])
def test_exit_resu_removes_hooks_and_flag_and_merges(commit):
    layer = _layer()
    layer.prune_by_magnitude(0.5)
    hooks = _hook_counts(layer.weight)
    layer.enter_resu_mode(epsilon=0.5, generator=_gen())
    assert layer.weight.resu_layout.write_policy is WritePolicy.RESTORE_ACTIVE
    theta = layer.weight.theta.clone()
    pruned = ~layer.weight.active_mask
    layer.exit_resu_mode(commit=commit)
    assert layer.weight.resu_layout.write_policy is WritePolicy.REFUSE
    # the core's own gradient hook (registered on the first RESU entry) is the only one that stays
    assert _hook_counts(layer.weight)[0] <= hooks[0] + 1 and _hook_counts(layer.weight)[1] == hooks[1]
    w = layer.weight.effective_weight()
    if commit:
        assert layer._mode is RESUMode.DENSE and torch.equal(w[pruned], theta)
    else:
        assert layer._mode is RESUMode.SPARSE and (w[pruned] == 0).all()
    layer(torch.randn(3, IN)).sum().backward()
    assert type(layer.weight.grad) is torch.Tensor


# ---------------------------------------------------------------------- QRESU with a stock optimizer on θ
def _qresu_layer(seed=0, **kw):
    layer = _layer(seed)
    layer.prune_by_magnitude(0.5)
    layer.enter_qresu_mode(epsilon=0.5, generator=_gen(seed), **kw)
    return layer


@pytest.mark.parametrize("qscheme, group_size", [("per_channel", 128), ("per_tensor", 128), ("per_group", 8)])
def test_qresu_storage_accessors(qscheme, group_size):
    layer = _qresu_layer(bits=4, qscheme=qscheme, group_size=group_size)
    p = layer.weight
    assert layer._mode is RESUMode.QRESU and p._weight is None
    assert layer._theta is p._theta and layer._theta.shape == (p.n_pruned,) and layer._theta.requires_grad
    assert layer._W_A_quantized is p._qdata and layer._W_A_quantized.numel() == (IN * OUT + 1) // 2
    assert layer._qscale is p._qscale and layer._qzero is p._qzero
    assert p.quant_format.scheme == qscheme
    assert tuple(layer._qscale.shape) == p.quant_format.scale_shape(OUT, IN)


def test_stock_adam_on_theta_matches_resu_adamw_on_the_weight():
    stock, reference = _qresu_layer(), _qresu_layer()
    opt = torch.optim.Adam([stock._theta], lr=1e-2)
    ref_opt = resu.ResuAdamW([reference.weight], lr=1e-2, weight_decay=0.0)
    codes = stock._W_A_quantized.clone()
    theta0 = stock._theta.detach().clone()
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        _loss(stock, step).backward()
        _loss(reference, step).backward()
        assert stock._theta.grad is stock.weight.grad.values  # handed over, not copied
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(stock._theta, reference._theta)
    assert not torch.equal(stock._theta.detach(), theta0)
    assert torch.equal(stock._W_A_quantized, codes)


def test_qresu_theta_gradient_accumulates_then_restarts_after_zero_grad():
    layer, reference = _qresu_layer(), _qresu_layer()
    opt = torch.optim.SGD([layer._theta], lr=0.0)
    _loss(layer, 1).backward()
    _loss(layer, 2).backward()
    _loss(reference, 1).backward()
    first = reference.weight.grad.values.clone()
    reference.weight.grad = None
    _loss(reference, 2).backward()
    torch.testing.assert_close(layer._theta.grad, first + reference.weight.grad.values)
    opt.zero_grad()  # clears _theta.grad only
    _loss(layer, 3).backward()
    reference.weight.grad = None
    _loss(reference, 3).backward()
    torch.testing.assert_close(layer._theta.grad, reference.weight.grad.values)


def test_qresu_stock_training_under_torch_compile_matches_eager():
    eager, compiled_layer = _qresu_layer(), _qresu_layer()
    compiled = torch.compile(compiled_layer, fullgraph=True)
    opts = [torch.optim.Adam([l._theta], lr=1e-2) for l in (eager, compiled_layer)]
    for step in range(2):
        x = torch.randn(5, IN, generator=_gen(step))
        for module, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            module(x).pow(2).mean().backward()
        torch.testing.assert_close(compiled_layer._theta.grad, eager._theta.grad)
        for opt in opts:
            opt.step()
    torch.testing.assert_close(compiled_layer._theta, eager._theta)


@pytest.mark.parametrize("commit", [True, False])
def test_exit_qresu_removes_hooks_and_merges(commit):
    layer = _layer()
    layer.prune_by_magnitude(0.5)
    layer.enter_resu_mode(generator=_gen())  # registers the core's hook once
    layer.exit_resu_mode(commit=False)
    hooks = _hook_counts(layer.weight)
    layer.enter_qresu_mode(epsilon=0.5, generator=_gen())
    assert _hook_counts(layer.weight) == (hooks[0] + 1, hooks[1] + 1)
    expected = layer.weight.effective_weight().clone()
    pruned = ~layer.weight.active_mask
    layer.exit_qresu_mode(commit=commit)
    assert _hook_counts(layer.weight) == hooks
    w = layer.weight.effective_weight()
    if commit:
        assert layer._mode is RESUMode.DENSE and torch.equal(w, expected)
    else:
        assert layer._mode is RESUMode.SPARSE and (w[pruned] == 0).all()
        assert torch.equal(w[~pruned], expected[~pruned])


# ---------------------------------------------------------------------- QRESU-Selective
def test_qresu_selective_steps_theta_during_backward_and_matches_resu_adamw():
    config = SelectionConfig(k_select_ratio=0.25, tau_stable=0.0)
    layer = _layer()
    layer.prune_by_magnitude(0.5)
    layer.enter_qresu_selective_mode(bits=4, epsilon=0.5, selective_config=config, lr=1e-2, generator=_gen())
    reference = _layer()
    reference.prune_by_magnitude(0.5)
    resu.enter_qresu_(reference, epsilon=0.5, generator=_gen())
    ref_opt = resu.ResuAdamW([reference.weight], lr=1e-2, weight_decay=0.0, selective=config)
    bias_opt = torch.optim.Adam([layer.bias], lr=1e-2)  # "other params" train as usual
    ref_bias_opt = torch.optim.Adam([reference.bias], lr=1e-2)
    n_select = config.select_count(layer.weight.n_pruned)
    for step in range(3):
        before = layer._theta.detach().clone()
        bias_opt.zero_grad()
        _loss(layer, step).backward()
        bias_opt.step()
        ref_opt.zero_grad()
        ref_bias_opt.zero_grad()
        _loss(reference, step).backward()
        ref_opt.step()
        ref_bias_opt.step()
        assert layer.weight.grad is None  # consumed by the hook
        moved = int((layer._theta != before).sum())
        assert 0 < moved <= n_select
        torch.testing.assert_close(layer._theta, reference._theta)


def test_qresu_selective_exit_drops_the_optimizer_and_hooks():
    layer = _layer()
    layer.prune_by_magnitude(0.5)
    hooks = _hook_counts(layer.weight)
    layer.enter_qresu_selective_mode(generator=_gen())
    assert isinstance(layer._selective_optimizer, resu.ResuAdamW)
    assert layer._selective_optimizer.param_groups[0]["selective"] == SelectionConfig()
    _loss(layer, 0).backward()
    layer.exit_qresu_mode(commit=True)
    assert layer._selective_optimizer is None and layer._mode is RESUMode.DENSE
    assert _hook_counts(layer.weight)[1] == hooks[1] and _hook_counts(layer.weight)[0] <= hooks[0] + 1
    assert getattr(layer.weight, "_selective", None) is None
