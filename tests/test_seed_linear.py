"""RESULinear: the seed API's layer over the core (construction, modes, pruning, activation capture, phase errors).

Its θ phases (stock optimizers, QRESU, QRESU-Selective) are tested in test_seed_linear_phases.py.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.modules.linear import RESULinear, RESUMode
from resu.prune.select import lowest_scores

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
