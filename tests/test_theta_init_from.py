"""θ started from the weights before pruning: resu.snapshot_weights + init_from in enter_resu_ /
enter_qresu_ / recover_ (resu/api/theta_phase.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import resu
from resu import ResuMode, ResuParameter


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    resu.sparsify_(model)
    return model


def _weights(model) -> dict[str, ResuParameter]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, ResuParameter)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapshot_is_a_plain_dense_copy_that_pruning_does_not_touch(seed):
    model = _model(seed)
    snap = resu.snapshot_weights(model)
    assert set(snap) == set(_weights(model))
    for name, p in _weights(model).items():
        assert type(snap[name]) is torch.Tensor and snap[name].device.type == "cpu"
        assert torch.equal(snap[name], p.effective_weight())
    resu.prune_(model, 0.5)
    for name, p in _weights(model).items():
        assert torch.all(p.effective_weight()[~p.active_mask] == 0)
        assert torch.count_nonzero(snap[name][~p.active_mask]) > 0  # the copy kept the pruned values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_enter_resu_from_the_snapshot_restores_the_unpruned_weights_exactly(seed):
    model = _model(seed)
    snap = resu.snapshot_weights(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed))
    dense_out = model(x)
    resu.prune_(model, 0.6)
    resu.enter_resu_(model, epsilon=0.3, init_from=snap)  # epsilon is not used: θ is the old values
    for name, p in _weights(model).items():
        assert p.mode is ResuMode.RESU
        assert torch.equal(p.effective_weight(), snap[name])
    torch.testing.assert_close(model(x), dense_out, rtol=0, atol=0)
    # the active slots are still frozen: a step moves θ only
    w0 = {n: p.effective_weight().clone() for n, p in _weights(model).items()}
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    model(x).square().sum().backward()
    opt.step()
    for name, p in _weights(model).items():
        active = p.active_mask
        assert torch.equal(p.effective_weight()[active], w0[name][active])
        assert not torch.equal(p.effective_weight()[~active], w0[name][~active])


@pytest.mark.parametrize("scheme, group_size", [("per_group", 16), ("nf4", 16)])
def test_enter_qresu_from_the_snapshot_puts_the_old_values_in_theta(scheme, group_size):
    model = _model(3)
    snap = resu.snapshot_weights(model)
    resu.prune_(model, 0.5)
    resu.enter_qresu_(model, bits=4, scheme=scheme, group_size=group_size, init_from=snap)
    for name, p in _weights(model).items():
        pruned = ~p.active_mask
        w = p.effective_weight()
        assert torch.equal(w[pruned], snap[name][pruned])  # θ exact (fp32 weights)
        # active slots: the quantized old values, close to but not the same as the snapshot
        err = (w[~pruned] - snap[name][~pruned]).abs().max()
        assert 0 < err < 0.5 * snap[name].abs().max()


def test_init_from_errors_name_the_fix_and_change_nothing():
    model = _model(4)
    snap = resu.snapshot_weights(model)
    resu.prune_(model, 0.5)
    before = {n: p.effective_weight().clone() for n, p in _weights(model).items()}
    missing = dict(snap)
    missing.pop("2.weight")
    with pytest.raises(ValueError, match=r"init_from has no entry '2\.weight'.*snapshot_weights"):
        resu.enter_resu_(model, init_from=missing)
    wrong = dict(snap, **{"2.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"init_from\['2\.weight'\] must be a tensor of shape \(32, 48\)"):
        resu.enter_qresu_(model, init_from=wrong)
    with pytest.raises(ValueError, match="init_from must be a mapping"):
        resu.enter_resu_(model, init_from=[snap["0.weight"]])
    for n, p in _weights(model).items():
        assert p.mode is ResuMode.SPARSE and torch.equal(p.effective_weight(), before[n])
