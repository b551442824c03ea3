"""Memory utilities against byte counts computed by hand from shapes and dtypes."""

import math

import pytest
import torch
import torch.nn as nn

import resu
from resu.modules.linear import RESULinear
from resu.utils.memory import (
    BREAKDOWN_KEYS,
    MB,
    get_tensor_memory,
    measure_layer_memory,
    model_memory,
    parameter_memory,
)

OUT, IN = 12, 40
NUMEL = OUT * IN


def _mask_bytes(n_pruned):
    """The adaptive encoding's size: the smallest of pruned indices, active indices (int32) and a bitmap."""
    return min(4 * n_pruned, 4 * (NUMEL - n_pruned), math.ceil(NUMEL / 8))


def _layer(sparsity=None, seed=0):
    torch.manual_seed(seed)
    layer = RESULinear(IN, OUT)
    if sparsity is not None:
        layer.prune_by_magnitude(sparsity, global_pruning=True)
    return layer


def _backward(layer):
    layer(torch.randn(5, IN)).pow(2).mean().backward()


@pytest.mark.parametrize("shape, dtype, size", [((7, 3), torch.float32, 4), ((5,), torch.float16, 2), ((2, 3, 4), torch.int32, 4)])
def test_get_tensor_memory_of_plain_tensors(shape, dtype, size):
    t = torch.zeros(shape, dtype=dtype)
    assert get_tensor_memory(t) == math.prod(shape) * size / 2**20
    assert get_tensor_memory(None) == 0.0


def test_dense_and_sparse_parameter_breakdown():
    layer = _layer()
    dense = parameter_memory(layer.weight)
    assert set(dense) == set(BREAKDOWN_KEYS)
    assert dense["weight"] == NUMEL * 4 and dense["mask"] == 0 and dense["total"] == NUMEL * 4
    layer.prune_by_magnitude(0.5, global_pruning=True)
    sparse = parameter_memory(layer.weight)
    assert sparse["mask"] == _mask_bytes(NUMEL // 2)
    assert sparse["total"] == NUMEL * 4 + _mask_bytes(NUMEL // 2)
    assert get_tensor_memory(layer.weight) == NUMEL * 4 / MB  # the value storage, mask reported apart


@pytest.mark.parametrize("sparsity", [0.01, 0.5, 0.99])
def test_mask_bytes_follow_the_adaptive_encoding(sparsity):
    layer = _layer(sparsity)
    n_pruned = round(sparsity * NUMEL)
    assert parameter_memory(layer.weight)["mask"] == _mask_bytes(n_pruned)


def test_resu_gradient_and_resu_adamw_states_are_compact():
    layer = _layer(0.3)
    layer.enter_resu_mode(stock_optimizer=False)
    n = layer.weight.n_pruned
    opt = resu.ResuAdamW([layer.weight], lr=1e-3)
    _backward(layer)
    opt.step()
    b = parameter_memory(layer.weight, opt)
    assert b["weight"] == NUMEL * 4 and b["theta"] == 0  # θ lives inside the dense weight
    assert b["grad"] == n * 4
    assert b["optimizer_states"] == 2 * n * 4 + 4  # exp_avg, exp_avg_sq (θ slots) and the fp32 step
    assert b["total"] == NUMEL * 4 + _mask_bytes(n) + n * 4 + 2 * n * 4 + 4


def test_stock_optimizer_opt_in_costs_a_dense_gradient():
    layer = _layer(0.3)
    layer.enter_resu_mode()
    opt = torch.optim.Adam([layer.weight], lr=1e-3)
    _backward(layer)
    opt.step()
    b = parameter_memory(layer.weight, [opt])
    assert b["grad"] == NUMEL * 4
    assert b["optimizer_states"] == 2 * NUMEL * 4 + 4


@pytest.mark.parametrize(
    "bits, qscheme, group_size, n_scales",
    [(4, "per_channel", 128, OUT), (8, "per_tensor", 128, 1), (4, "per_group", 16, OUT * math.ceil(IN / 16))],
)
def test_qresu_breakdown(bits, qscheme, group_size, n_scales):
    layer = _layer(0.3)
    layer.enter_qresu_mode(bits=bits, qscheme=qscheme, group_size=group_size)
    n = layer.weight.n_pruned
    codes = math.ceil(NUMEL / 2) if bits == 4 else NUMEL
    b = parameter_memory(layer.weight)
    assert (b["weight"], b["codes"], b["scales"], b["theta"], b["mask"], b["grad"]) == (
        0, codes, 2 * n_scales * 4, n * 4, _mask_bytes(n), 0,
    )
    opt = torch.optim.Adam([layer._theta], lr=1e-3)
    _backward(layer)
    opt.step()
    b = parameter_memory(layer.weight, opt)
    assert b["grad"] == n * 4  # _theta.grad shares the CompactGrad's storage: counted once
    assert b["optimizer_states"] == 2 * n * 4 + 4  # the stock optimizer's states of _theta
    assert b["total"] == codes + 2 * n_scales * 4 + n * 4 + _mask_bytes(n) + n * 4 + 2 * n * 4 + 4
    mb = measure_layer_memory(layer)
    assert set(mb) == {"mask", "theta", "W_A_quantized", "qparams", "total"}
    assert mb["W_A_quantized"] == codes / MB and mb["qparams"] == 2 * n_scales * 4 / MB
    assert mb["total"] == pytest.approx((codes + 2 * n_scales * 4 + n * 4 + _mask_bytes(n)) / MB)


def test_measure_layer_memory_in_dense_and_resu_modes():
    layer = _layer()
    assert measure_layer_memory(layer) == {"weight": NUMEL * 4 / MB, "total": NUMEL * 4 / MB}
    layer.prune_by_magnitude(0.5, global_pruning=True)
    layer.enter_resu_mode()
    mb = measure_layer_memory(layer)
    assert mb == {"weight": NUMEL * 4 / MB, "mask": _mask_bytes(NUMEL // 2) / MB, "total": pytest.approx(mb["weight"] + mb["mask"])}
    with pytest.raises(ValueError, match="RESULinear"):
        measure_layer_memory(nn.Linear(3, 2))


def test_selective_layer_reports_its_own_optimizer_states():
    layer = _layer(0.5)
    layer.enter_qresu_selective_mode()
    assert "selective_states" not in measure_layer_memory(layer)  # nothing allocated before a step
    _backward(layer)
    states = layer._selective_optimizer.state[layer.weight]
    expected = sum(t.numel() * t.element_size() for t in states.values() if isinstance(t, torch.Tensor))
    assert expected >= 2 * layer.weight.n_pruned * 4
    assert measure_layer_memory(layer)["selective_states"] == expected / MB
    assert model_memory(layer)["optimizer_states"] == expected


def test_model_memory_sums_parameters_and_counts_tied_weights_once():
    torch.manual_seed(0)
    shared = nn.Linear(IN, IN)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(IN, OUT, bias=False))
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, IN)).sum().backward()
    opt.step()
    report = model_memory(model, opt)
    assert set(report["parameters"]) == {"0.weight", "0.bias", "3.weight"}
    n0, n3 = IN * IN // 2, NUMEL // 2
    mask0 = min(4 * n0, math.ceil(IN * IN / 8))
    weights = IN * IN * 4 + IN * 4 + NUMEL * 4
    assert report["weight"] == weights
    assert report["mask"] == mask0 + _mask_bytes(n3)
    # SPARSE: gradients are dense; Adam states cover the active slots only (plain bias: every slot)
    assert report["grad"] == weights
    assert report["optimizer_states"] == 2 * 4 * ((IN * IN - n0) + IN + (NUMEL - n3)) + 3 * 4
    assert report["total"] == sum(b["total"] for b in report["parameters"].values())
    with pytest.raises(ValueError, match="Optimizer"):
        model_memory(model, optimizer=["adam"])
