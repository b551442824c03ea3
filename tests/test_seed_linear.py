"""RESULinear: the seed API's layer over the core (modes, pruning, activation capture, phases, hooks, errors)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.core.selective import SelectionConfig
from resu.modules.linear import RESULinear, RESUMode
from resu.prune.select import lowest_scores
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.layout import WritePolicy

IN, OUT = 24, 10


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return RESULinear(IN, OUT, **kw)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _loss(layer, seed):
    x = torch.randn(6, IN, generator=_gen(seed))
    return layer(x).pow(2).mean()


def _hook_counts(p):
    return len(p._post_accumulate_grad_hooks or {}), len(p._backward_hooks or {})


def _state(layer):
    p = layer.weight
    return p.mode, p.effective_weight().clone(), p.active_mask.clone()


def _assert_same_state(a, b):
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


# ---------------------------------------------------------------------- construction and modes
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_is_an_nn_linear_with_a_resu_weight(bias, dtype):
    layer = _layer(bias=bias, dtype=dtype)
    assert isinstance(layer, nn.Linear)
    assert isinstance(layer.weight, resu.ResuParameter) and isinstance(layer.weight, nn.Parameter)
    assert layer.weight.dtype == dtype and (layer.bias is not None) == bias
    assert layer._mode is RESUMode.DENSE and layer._mask is None and layer._theta is None
    x = torch.randn(3, 5, IN, dtype=dtype)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight.effective_weight(), layer.bias))


def test_mode_follows_every_phase_and_matches_the_weight_mode():
    layer = _layer()
    seen = [layer._mode]
    layer.prune_by_magnitude(0.5)
    seen.append(layer._mode)
    layer.enter_resu_mode(generator=_gen())
    seen.append(layer._mode)
    assert layer._mode == resu.ResuMode.RESU  # same string values as the core enum
    layer.exit_resu_mode(commit=False)
    seen.append(layer._mode)
    layer.enter_qresu_mode(generator=_gen())
    seen.append(layer._mode)
    layer.exit_qresu_mode(commit=False)
    layer.enter_qresu_selective_mode(generator=_gen())
    seen.append(layer._mode)
    layer.exit_qresu_mode(commit=True)
    seen.append(layer._mode)
    assert seen == [
        RESUMode.DENSE, RESUMode.SPARSE, RESUMode.RESU, RESUMode.SPARSE,
        RESUMode.QRESU, RESUMode.QRESU_SELECTIVE, RESUMode.DENSE,
    ]
    assert "mode=dense" in repr(layer)


# ---------------------------------------------------------------------- pruning
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_prune_by_magnitude_per_row_prunes_the_smallest_of_each_row(sparsity):
    layer = _layer()
    w0 = layer.weight.effective_weight().clone()
    layer.prune_by_magnitude(sparsity)
    pruned = ~layer.weight.active_mask
    k = round(sparsity * IN)
    assert (pruned.sum(1) == k).all()
    assert layer._mask.sparsity == pytest.approx(k * OUT / (IN * OUT))
    assert (layer.weight.effective_weight()[pruned] == 0).all()
    for r in range(OUT):  # every pruned |w| is below every kept |w| of its row
        assert w0[r][pruned[r]].abs().max() <= w0[r][~pruned[r]].abs().min()


def test_prune_by_magnitude_global_ranks_the_whole_matrix():
    layer = _layer()
    w0 = layer.weight.effective_weight().clone()
    layer.prune_by_magnitude(0.6, global_pruning=True)
    pruned = ~layer.weight.active_mask
    assert int(pruned.sum()) == round(0.6 * IN * OUT)
    assert w0[pruned].abs().max() <= w0[~pruned].abs().min()
    assert pruned.sum(1).unique().numel() > 1  # rows differ: not a per-row rule


def test_activation_capture_is_the_l2_norm_over_every_token_seen():
    layer = _layer()
    assert layer._activation_norms is None
    layer(torch.randn(4, IN))  # not captured: the flag is off
    assert layer._activation_norms is None
    layer._capture_activations = True
    batches = [torch.randn(2, 3, IN), torch.randn(5, IN)]
    for x in batches:
        layer(x)
    tokens = torch.cat([b.reshape(-1, IN) for b in batches])
    torch.testing.assert_close(layer._activation_norms, tokens.pow(2).sum(0).sqrt())
    assert "_activation_sumsq" not in layer.state_dict()
    layer._activation_norms = None
    assert layer._activation_norms is None
    with pytest.raises(ValueError, match="None"):
        layer._activation_norms = torch.ones(IN)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_prune_by_wanda_with_captured_norms_matches_the_core_wanda(global_pruning):
    batches = [torch.randn(8, IN) * torch.rand(IN) * 3 for _ in range(2)]
    layer = _layer(seed=3)
    reference = resu.sparsify_(nn.Sequential(nn.Linear(IN, OUT)))
    with torch.no_grad():
        reference[0].weight.copy_(layer.weight.effective_weight())
    w0 = layer.weight.effective_weight().clone()
    layer._capture_activations = True
    for x in batches:
        layer(x)
    layer.prune_by_wanda(0.5, layer._activation_norms, global_pruning=global_pruning)
    scope = "global" if global_pruning else "row"
    resu.prune_(reference, 0.5, method="wanda", scope=scope, calib=batches)
    assert torch.equal(layer.weight.active_mask, reference[0].weight.active_mask)
    # the norms matter: magnitude alone picks another mask
    assert not torch.equal(layer.weight.active_mask, ~lowest_scores(w0.abs(), 0.5, scope))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda l: l.prune_by_magnitude(-0.1), "sparsity"),
        (lambda l: l.prune_by_magnitude(1.5), "sparsity"),
        (lambda l: l.prune_by_magnitude(float("nan")), "sparsity"),
        (lambda l: l.prune_by_magnitude("0.5"), "sparsity"),
        (lambda l: l.prune_by_magnitude(0.5, global_pruning="yes"), "global_pruning"),
        (lambda l: l.prune_by_wanda(0.5, torch.rand(IN + 1)), r"shape \[24\]"),
        (lambda l: l.prune_by_wanda(0.5, torch.rand(OUT, IN)), r"shape \[24\]"),
        (lambda l: l.prune_by_wanda(0.5, -torch.rand(IN)), ">= 0"),
        (lambda l: l.prune_by_wanda(0.5, torch.full((IN,), float("inf"))), "finite"),
        (lambda l: l.prune_by_wanda(0.5, torch.ones(IN, dtype=torch.int64)), "floating-point"),
        (lambda l: l.prune_by_wanda(0.5, [1.0] * IN), "floating-point"),
        (lambda l: l.prune_by_wanda(2.0, torch.rand(IN)), "sparsity"),
    ],
)
def test_bad_pruning_arguments_raise_and_change_nothing(call, match):
    layer = _layer()
    layer.prune_by_magnitude(0.3)
    before = _state(layer)
    with pytest.raises(ValueError, match=match):
        call(layer)
    _assert_same_state(_state(layer), before)


@pytest.mark.parametrize("enter", ["enter_resu_mode", "enter_qresu_mode", "enter_qresu_selective_mode"])
def test_pruning_during_a_theta_phase_is_refused(enter):
    layer = _layer()
    layer.prune_by_magnitude(0.5)
    getattr(layer, enter)(generator=_gen())
    exit_name = "exit_resu_mode" if enter == "enter_resu_mode" else "exit_qresu_mode"
    before = layer.weight.effective_weight().clone()
    with pytest.raises(ValueError, match=exit_name):
        layer.prune_by_magnitude(0.5)
    with pytest.raises(ValueError, match=exit_name):
        layer.prune_by_wanda(0.5, torch.rand(IN))
    assert torch.equal(layer.weight.effective_weight(), before)


# ---------------------------------------------------------------------- phase errors
def test_phase_errors_name_the_fix_and_change_nothing():
    layer = _layer()
    for enter in ("enter_resu_mode", "enter_qresu_mode", "enter_qresu_selective_mode"):
        with pytest.raises(ValueError, match="prune_by_magnitude"):
            getattr(layer, enter)()
    layer.prune_by_magnitude(0.5)
    before = _state(layer)
    hooks = _hook_counts(layer.weight)
    with pytest.raises(ValueError, match="enter_resu_mode"):
        layer.exit_resu_mode()
    with pytest.raises(ValueError, match="enter_qresu_mode"):
        layer.exit_qresu_mode()
    with pytest.raises(ValueError, match="bits"):
        layer.enter_qresu_mode(bits=3)
    with pytest.raises(ValueError, match="scheme"):
        layer.enter_qresu_mode(qscheme="per_row")
    with pytest.raises(ValueError, match="epsilon"):
        layer.enter_resu_mode(epsilon=-1.0)
    with pytest.raises(ValueError, match="stock_optimizer"):
        layer.enter_resu_mode(stock_optimizer=1)
    with pytest.raises(ValueError, match="selective_config"):
        layer.enter_qresu_selective_mode(selective_config={"beta": 0.9})
    with pytest.raises(ValueError, match="lr"):
        layer.enter_qresu_selective_mode(lr=-1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        layer.enter_qresu_selective_mode(weight_decay=float("nan"))
    _assert_same_state(_state(layer), before)
    assert _hook_counts(layer.weight) == hooks and layer._selective_optimizer is None
    layer.enter_resu_mode(generator=_gen())
    with pytest.raises(ValueError, match="exit_resu_mode"):
        layer.enter_qresu_mode()
    with pytest.raises(ValueError, match="exit_resu_mode"):
        layer.exit_qresu_mode()
    with pytest.raises(ValueError, match="commit"):
        layer.exit_resu_mode(commit="yes")
    assert layer._mode is RESUMode.RESU
    layer.exit_resu_mode(commit=False)
    layer.enter_qresu_mode(generator=_gen())
    with pytest.raises(ValueError, match="exit_qresu_mode"):
        layer.exit_resu_mode()


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
    assert layer.weight.layout.write_policy is WritePolicy.RESTORE_ACTIVE
    theta = layer.weight.theta.clone()
    pruned = ~layer.weight.active_mask
    layer.exit_resu_mode(commit=commit)
    assert layer.weight.layout.write_policy is WritePolicy.REFUSE
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
