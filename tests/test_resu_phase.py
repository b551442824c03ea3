"""resu.enter_resu_ / resu.exit_resu_ (resu/api/resu_phase.py): θ in the pruned slots, and back."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import resu
from resu import ResuMode, ResuParameter
from tests.models import SharedPair, bits, eff, expected_row_pruned, pruned_of, rand_input, random_weight_linear, same_bits


# --------------------------------------------------------------------------
# enter_resu_ / exit_resu_
# --------------------------------------------------------------------------


def mask_state(p: ResuParameter):
    return p.mask.encoding, bits(p.mask.storage), p.n_pruned


def same_mask(a, b) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def sparse_big(sparsity=0.5, method="magnitude", seed=0) -> nn.Sequential:
    model = nn.Sequential(random_weight_linear(256, 256, seed=seed))
    resu.sparsify_(model)
    resu.prune_(model, sparsity, method=method, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_enter_resu_theta_statistics(epsilon, method):
    model = sparse_big(0.5, method)
    p = model[0].weight
    w_sparse = eff(p).clone()
    pruned = pruned_of(p)
    mask_before = mask_state(p)
    active = w_sparse[~pruned]

    assert resu.enter_resu_(model, epsilon, generator=torch.Generator().manual_seed(3)) is model

    assert p.mode is ResuMode.RESU
    assert same_mask(mask_state(p), mask_before)
    assert torch.equal(pruned_of(p), pruned)
    w = eff(p)
    theta = w[pruned]
    assert theta.numel() == 256 * 128
    assert torch.all(theta != 0)
    assert same_bits(w[~pruned], w_sparse[~pruned])
    target = epsilon * float(active.std())
    assert float(theta.std()) == pytest.approx(target, rel=0.05)
    assert abs(float(theta.mean())) < 0.05 * target
    # θ is independent noise, not a function of the active weights
    w_dense = random_weight_linear(256, 256, seed=0).weight.detach()  # the weight before pruning
    assert torch.all(w_dense[~pruned] == w_sparse[~pruned])
    assert abs(float(torch.corrcoef(torch.stack([theta, w_dense[pruned]]))[0, 1])) < 0.05


def test_enter_resu_reproducible_with_generator():
    thetas = []
    for seed in (5, 5, 6):
        model = sparse_big()
        resu.enter_resu_(model, 0.1, generator=torch.Generator().manual_seed(seed))
        p = model[0].weight
        thetas.append(eff(p)[pruned_of(p)].clone())
    assert same_bits(thetas[0], thetas[1])
    assert not torch.equal(thetas[0], thetas[2])


def test_enter_resu_zero_epsilon_gives_zero_theta():
    model = sparse_big()
    p = model[0].weight
    w_sparse = eff(p).clone()
    pruned = pruned_of(p)
    resu.enter_resu_(model, 0.0)
    assert p.mode is ResuMode.RESU
    assert torch.all(eff(p)[pruned] == 0)
    assert same_bits(eff(p)[~pruned], w_sparse[~pruned])


def test_enter_resu_shared_weight_once():
    torch.manual_seed(0)
    model = SharedPair()
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, 0.2, generator=torch.Generator().manual_seed(0))
    assert model.a.weight is model.b.weight
    assert model.a.weight.mode is ResuMode.RESU and model.c.weight.mode is ResuMode.RESU


def _resu_model():
    model = sparse_big(0.5, "magnitude")
    p = model[0].weight
    w_sparse = eff(p).clone()
    pruned = pruned_of(p)
    mask_before = mask_state(p)
    resu.enter_resu_(model, 0.1, generator=torch.Generator().manual_seed(4))
    return model, w_sparse, pruned, mask_before


def test_exit_resu_commit_keeps_theta_and_is_dense():
    model, w_sparse, pruned, _ = _resu_model()
    p = model[0].weight
    w_resu = eff(p).clone()
    x = rand_input(5, 256)
    with torch.no_grad():
        y_resu = model(x)

    assert resu.exit_resu_(model, commit=True) is model

    assert model[0].weight is p
    assert p.mode is ResuMode.DENSE
    assert p.mask is None and p.n_pruned == 0 and p.sparsity == 0.0
    assert torch.all(p.active_mask)
    assert same_bits(eff(p), w_resu)
    assert torch.all(eff(p)[pruned] != 0)
    assert same_bits(eff(p)[~pruned], w_sparse[~pruned])
    with torch.no_grad():
        assert same_bits(model(x), y_resu)
    # a committed model can be pruned again; the kept θ takes part in the ranking
    resu.prune_(model, 0.5)
    assert torch.equal(pruned_of(p), expected_row_pruned(w_resu.abs(), 128))


def test_exit_resu_without_commit_returns_to_sparse():
    model, w_sparse, pruned, mask_before = _resu_model()
    p = model[0].weight
    x = rand_input(5, 256)
    with torch.no_grad():
        y_sparse_ref = x @ w_sparse.t() + model[0].bias.detach()

    assert resu.exit_resu_(model, commit=False) is model

    assert p.mode is ResuMode.SPARSE
    assert same_mask(mask_state(p), mask_before)
    assert torch.equal(pruned_of(p), pruned)
    w = eff(p)
    assert torch.all(w[pruned] == 0)
    assert not torch.any(torch.signbit(w[pruned]))  # +0.0, exactly the SPARSE zeros
    assert same_bits(w, w_sparse)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_sparse_ref)
    # and RESU can start again from there
    resu.enter_resu_(model, 0.1)
    assert p.mode is ResuMode.RESU
