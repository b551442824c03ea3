"""RESUCycle and RESUTrainer: the five phases, the optimizer hand-over, hooks, summary, logging, progress."""

import logging
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.training.config import RESUConfig
from resu.training.cycle import RESUCycle, RESUTrainer
from resu.training.progress import phase_bar


def _task(seed=0, n=192, d=12, classes=3, batch=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, classes, generator=gen)).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)], (x, y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def train_step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _config(**kw):
    base = dict(target_sparsity=0.6, num_cycles=2, steps_per_cycle=20, pruning_method="magnitude", resu_lr=1e-2,
                progress_bar=False, calib_batches=2)
    return RESUConfig(**{**base, **kw})


def _weights(model):
    return [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]


def test_cycle_runs_the_five_phases_on_a_plain_model():
    loader, _ = _task()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = _config(num_cycles=1)
    stats = RESUCycle(model=model, config=cfg, optimizer=opt, train_fn=train_step, cycle_num=0).run(loader)
    assert all(isinstance(p, resu.ResuParameter) for p in (model[0].weight, model[2].weight))  # sparsified on the way in
    train_steps, _, resu_steps = cfg.phase_steps()
    assert (stats.cycle, stats.train_steps, stats.resu_steps) == (0, train_steps, resu_steps)
    assert stats.target_sparsity == 0.6 and stats.pruned
    assert stats.actual_sparsity == pytest.approx(0.6, abs=0.05)
    assert all(p.mode is resu.ResuMode.SPARSE for p in _weights(model))
    n_active = sum(p.numel() - p.n_pruned for p in _weights(model))
    assert stats.n_resurrected + stats.n_active_kept == n_active
    assert stats.n_resurrected > 0 and stats.resurrection_budget == pytest.approx(cfg.amnesty_r_start)
    n_theta = sum(p.n_pruned for p in _weights(model))
    assert stats.resu_updates == resu_steps * n_theta
    assert math.isfinite(stats.train_loss) and math.isfinite(stats.resu_loss)
    assert math.isnan(stats.mean_consistency) and stats.mean_selection_ratio == 1.0
    assert stats.duration_seconds > 0
    # the user's optimizer stepped in TRAIN only; RESU used its own
    assert all(int(s["step"]) == train_steps for s in opt.state.values())


def test_active_weights_stay_frozen_during_resu_and_theta_trains():
    loader, _ = _task(1)
    seen = []

    def recording_step(model, batch):
        w = model[0].weight
        if w.mode is resu.ResuMode.RESU:
            seen.append((w.active_mask.clone(), w.effective_weight().clone()))
        return train_step(model, batch)

    model = _model(1)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    RESUTrainer(model, _config(num_cycles=1), opt, recording_step).train(loader)
    assert len(seen) >= 2
    mask, first = seen[0]
    for m, w in seen[1:]:
        assert torch.equal(m, mask)
        assert torch.equal(w[mask], first[mask])
    assert not torch.equal(seen[-1][1][~mask], first[~mask])  # θ moved


def test_unfrozen_resu_trains_active_weights_too():
    loader, _ = _task(2)
    seen = []

    def recording_step(model, batch):
        seen.append((model[0].weight.mode, model[0].weight.effective_weight().clone()))
        return train_step(model, batch)

    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = _config(num_cycles=1, freeze_active_during_resu=False)
    stats = RESUTrainer(model, cfg, opt, recording_step).train(loader)[0]
    resu_calls = [w for mode, w in seen[-cfg.phase_steps()[2]:]]
    assert all(mode is resu.ResuMode.DENSE for mode, _ in seen[-cfg.phase_steps()[2]:])
    assert not torch.equal(resu_calls[0], resu_calls[-1])
    assert stats.actual_sparsity == pytest.approx(0.6, abs=0.05) and stats.n_resurrected > 0


def test_stock_optimizer_states_restart_where_the_mask_changed():
    loader, _ = _task(3)
    model = _model(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = RESUTrainer(model, _config(num_cycles=2, target_sparsity=0.5, amnesty_r_start=0.3), opt, train_step)
    trainer.train(loader, num_cycles=1)
    masks_before = {id(p): p.active_mask.clone() for p in _weights(model)}
    trainer.train(loader, num_cycles=1)
    changed_any = False
    for p in _weights(model):
        changed = masks_before[id(p)] ^ p.active_mask
        state = opt.state[p]
        assert bool((state["exp_avg"][changed] == 0).all()) and bool((state["exp_avg_sq"][changed] == 0).all())
        changed_any |= bool(changed.any())
    assert changed_any


def test_custom_pruner_and_stabilizer_hooks():
    loader, _ = _task(4)
    calls = []

    class ZeroingPruner:  # leaves weights DENSE with zeros: the trainer adopts the zeros as the mask
        def __init__(self, model):
            self.model = model

        def prune(self, sparsity):
            calls.append(("prune", sparsity))
            with torch.no_grad():
                for p in _weights(self.model):
                    w = p.effective_weight()
                    cut = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
                    p.data = torch.where(w.abs() <= cut, torch.zeros_like(w), w)

    def stabilizer(model, calib):
        calls.append(("stabilize", len(calib)))
        return 7

    model = resu.sparsify_(_model(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = _config(num_cycles=1, target_sparsity=0.5)
    trainer = RESUTrainer(model, cfg, opt, train_step, pruner=ZeroingPruner(model), stabilizer=stabilizer)
    stats = trainer.train(loader)[0]
    assert calls == [("prune", 0.5), ("stabilize", 2)]
    assert stats.stabilize_swaps == 7
    assert stats.actual_sparsity == pytest.approx(0.5, abs=0.02)


def test_trainer_summary_eval_and_logging(caplog):
    loader, (x, y) = _task(5)

    def evaluate(model):
        with torch.no_grad():
            return {"accuracy": (model(x).argmax(1) == y).float().mean().item()}

    model = _model(5)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    trainer = RESUTrainer(model=model, config=_config(num_cycles=3), optimizer=opt, train_fn=train_step, eval_fn=evaluate)
    with caplog.at_level(logging.INFO, logger="resu.training"):
        stats = trainer.train(loader)
    assert [s.cycle for s in stats] == [0, 1, 2] and trainer.stats == stats
    assert all(0 <= s.eval_metrics["accuracy"] <= 1 for s in stats)
    assert [s.target_sparsity for s in stats] == pytest.approx([0.2, 0.4, 0.6])
    summary = trainer.get_training_summary()
    assert summary["num_cycles"] == 3
    assert summary["final_sparsity"] == stats[-1].actual_sparsity
    assert summary["total_resurrected"] == sum(s.n_resurrected for s in stats)
    assert summary["final_eval"] == stats[-1].eval_metrics
    assert sum("cycle 2" in r.getMessage() for r in caplog.records) == 1
    assert trainer.train(loader) == []  # every configured cycle has run


def test_commit_strategies_through_the_trainer():
    loader, _ = _task(6)
    results = {}
    for strategy, extra in [("amnesty", {}), ("wanda_reprune", {}), ("simple", {}), ("amnesty", dict(use_amnesty=False))]:
        model = _model(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        cfg = _config(num_cycles=1, commit_strategy=strategy, pruning_method="wanda", **extra)
        results[(strategy, bool(extra))] = RESUTrainer(model, cfg, opt, train_step).train(loader)[0]
    assert results[("simple", False)].actual_sparsity == 0.0
    assert results[("simple", False)].resurrection_rate == 1.0
    for key in [("amnesty", False), ("wanda_reprune", False), ("amnesty", True)]:
        assert results[key].actual_sparsity == pytest.approx(0.6, abs=0.05)
    assert results[("amnesty", True)].resurrection_budget == 0.0


def test_no_resu_phase_means_no_commit():
    loader, _ = _task(7)
    model = _model(7)
    cfg = _config(num_cycles=1, train_fraction=0.9, stabilize_fraction=0.1, resu_fraction=0.0)
    stats = RESUTrainer(model, cfg, torch.optim.SGD(model.parameters(), lr=0.05), train_step).train(loader)[0]
    assert stats.resu_steps == 0 and stats.n_resurrected == 0 and stats.resu_updates == 0


def test_bad_arguments_are_rejected():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="config"):
        RESUTrainer(model, {"target_sparsity": 0.5}, opt, train_step)
    with pytest.raises(TypeError, match="optimizer"):
        RESUTrainer(model, _config(), "adam", train_step)
    with pytest.raises(TypeError, match="train_fn"):
        RESUTrainer(model, _config(), opt, None)
    with pytest.raises(ValueError, match="cycle_num"):
        RESUCycle(model, _config(), opt, train_step, cycle_num=-1)
    with pytest.raises(ValueError, match="num_cycles"):
        RESUTrainer(model, _config(), opt, train_step).train([], num_cycles=-2)
    with pytest.raises(ValueError, match="no batches"):
        RESUTrainer(model, _config(), opt, train_step).train([])


def test_progress_bars_only_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert type(phase_bar(10, "x", True)).__name__ == "_SilentBar"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert type(phase_bar(10, "x", False)).__name__ == "_SilentBar"
    bar = phase_bar(10, "x", True)
    try:
        assert type(bar).__name__ != "_SilentBar"
    finally:
        bar.close()
