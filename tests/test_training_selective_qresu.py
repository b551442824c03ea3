"""Config-driven selective (RESU-Selective) and QRESU phases of a cycle, and commit_ from QRESU mode.

These exercise ``resu.core.selective.SelectionConfig``, ``ResuAdamW(selective=...)``,
``ResuAdamW.selection_stats()``, ``resu.enter_qresu_`` and ``resu.exit_qresu_``.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.training.config import RESUConfig
from resu.training.cycle import RESUTrainer


def _loader(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 16, generator=gen)
    y = (x @ torch.randn(16, 3, generator=gen)).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def train_step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _config(**kw):
    base = dict(target_sparsity=0.5, sparsity_schedule="constant", num_cycles=2, steps_per_cycle=20, pruning_method="magnitude", resu_lr=1e-2,
                progress_bar=False, calib_batches=2)
    return RESUConfig(**{**base, **kw})


def test_selective_phase_fills_the_selection_stats():
    model = _model()
    cfg = _config(use_selective=True, selective_k_select_ratio=0.3, selective_tau=0.0)
    stats = RESUTrainer(model, cfg, torch.optim.SGD(model.parameters(), lr=0.05), train_step).train(_loader())
    for s in stats:
        n_theta_max = s.resu_steps * sum(p.numel() for p in model.parameters() if isinstance(p, resu.ResuParameter))
        assert math.isfinite(s.mean_consistency) and s.mean_consistency >= 0
        assert 0 < s.mean_selection_ratio <= 1
        assert 0 < s.resu_updates < n_theta_max
        assert s.actual_sparsity == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("scheme, group_size", [("per_channel", 128), ("nf4", 16)])
def test_qresu_phase_trains_theta_over_quantized_weights(scheme, group_size):
    seen_modes = []

    def recording_step(model, batch):
        seen_modes.append(model[0].weight.mode)
        return train_step(model, batch)

    model = _model(1)
    cfg = _config(use_qresu=True, qresu_bits=4, qresu_scheme=scheme, qresu_group_size=group_size)
    stats = RESUTrainer(model, cfg, torch.optim.SGD(model.parameters(), lr=0.05), recording_step).train(_loader(1))
    assert resu.ResuMode.QRESU in seen_modes
    for s in stats:
        assert s.n_resurrected > 0 and s.actual_sparsity == pytest.approx(0.5, abs=0.05)
        assert math.isfinite(s.resu_loss)
    assert all(p.mode is resu.ResuMode.SPARSE for p in model.parameters() if isinstance(p, resu.ResuParameter))


def test_commit_from_qresu_mode():
    model = resu.sparsify_(_model(2))
    resu.prune_(model, 0.6)
    pruned_before = {n: ~p.active_mask for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    resu.enter_qresu_(model, bits=4, scheme="per_channel", epsilon=1.0)
    stats = resu.commit_(model, "amnesty", r_start=0.2)
    assert stats.n_pruned_before == sum(int(m.sum()) for m in pruned_before.values())
    assert stats.n_resurrected > 0
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            assert p.mode is resu.ResuMode.SPARSE
            assert torch.equal(p.active_mask.sum(1), (~pruned_before[name]).sum(1))
