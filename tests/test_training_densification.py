"""Densification (sparsity going down) and DensificationTrainer's pauses and callbacks."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.training.callbacks import TrainerCallback
from resu.training.config import DensificationSchedule, RESUConfig, densification_config
from resu.training.densification import DensificationTrainer, PauseConfig, PauseReason, densification_targets


def _loader(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 10, generator=gen)
    y = (x @ torch.randn(10, 3, generator=gen)).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))


def train_step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _weights(model):
    return [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]


@pytest.mark.parametrize("schedule", list(DensificationSchedule))
def test_sparsity_goes_down_cycle_by_cycle(schedule):
    cfg = densification_config(
        steps_per_cycle=10, densification_schedule=schedule, pruning_method="magnitude", progress_bar=False, resu_lr=1e-2
    )
    model = _model()
    trainer = DensificationTrainer(model, cfg, torch.optim.SGD(model.parameters(), lr=0.05), train_step)
    stats = list(trainer.train_with_pauses(_loader()))
    targets = densification_targets(cfg)
    assert [s.target_sparsity for s in stats] == pytest.approx(targets)
    actual = [s.actual_sparsity for s in stats]
    assert actual == pytest.approx(targets, abs=0.05)
    assert all(b < a for a, b in zip(actual, actual[1:]))
    assert actual[-1] == 0.0
    # every densifying cycle revives at least the slots it must
    for before, s in zip(actual, stats[1:]):
        total = sum(p.numel() for p in _weights(model))
        assert s.n_resurrected >= round((before - s.actual_sparsity) * total) - 1


def test_pauses_stop_until_resume_and_call_back():
    events = []

    class Recorder(TrainerCallback):
        def on_cycle_start(self, trainer, cycle):
            events.append(("start", cycle))

        def on_cycle_end(self, trainer, stats):
            events.append(("end", stats.cycle))

        def on_pause(self, trainer, pause):
            events.append(("pause", pause.after_cycle, pause.reason))

        def on_resume(self, trainer):
            events.append(("resume",))

    cfg = RESUConfig(
        densify=True, initial_sparsity=0.6, densification_steps=[0.6, 0.4, 0.2], num_cycles=3, steps_per_cycle=8,
        pruning_method="magnitude", progress_bar=False,
    )
    model = _model(1)
    pauses = [PauseConfig(after_cycle=0, reason=PauseReason.RL_TRAINING, duration_steps=5),
              PauseConfig(after_cycle=1, reason="evaluation")]
    trainer = DensificationTrainer(
        model=model, config=cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_fn=train_step,
        pause_configs=pauses, callbacks=[Recorder()],
    )
    paused_after = []
    for s in trainer.train_with_pauses(_loader(1)):
        if trainer.is_paused:
            paused_after.append((s.cycle, trainer.current_pause.reason))
            # outside training on the SPARSE model between cycles
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(trainer.current_pause.duration_steps):
                loss = train_step(model, _loader(1)[0])
                opt.zero_grad()
                loss.backward()
                opt.step()
            trainer.resume()
    assert paused_after == [(0, PauseReason.RL_TRAINING), (1, PauseReason.EVALUATION)]
    assert events == [
        ("start", 0), ("end", 0), ("pause", 0, PauseReason.RL_TRAINING), ("resume",),
        ("start", 1), ("end", 1), ("pause", 1, PauseReason.EVALUATION), ("resume",),
        ("start", 2), ("end", 2),
    ]
    assert not trainer.is_paused


def test_asking_for_a_cycle_while_paused_is_an_error():
    cfg = RESUConfig(num_cycles=2, steps_per_cycle=6, target_sparsity=0.5, pruning_method="magnitude", progress_bar=False)
    model = _model(2)
    trainer = DensificationTrainer(model, cfg, torch.optim.SGD(model.parameters(), lr=0.05), train_step,
                                   pause_configs=[PauseConfig(after_cycle=0)])
    gen = trainer.train_with_pauses(_loader(2))
    next(gen)
    assert trainer.is_paused
    with pytest.raises(RuntimeError, match="resume"):
        next(gen)
    trainer.resume()
    with pytest.raises(RuntimeError, match="not paused"):
        trainer.resume()


def test_pause_config_validation():
    with pytest.raises(ValueError, match="after_cycle"):
        PauseConfig(after_cycle=-1)
    with pytest.raises(ValueError, match="duration_steps"):
        PauseConfig(after_cycle=0, duration_steps=-5)
    with pytest.raises(ValueError, match="reason"):
        PauseConfig(after_cycle=0, reason="nap")
    model = _model()
    with pytest.raises(ValueError, match="two pauses"):
        DensificationTrainer(model, RESUConfig(), torch.optim.SGD(model.parameters(), lr=0.1), train_step,
                             pause_configs=[PauseConfig(after_cycle=1), PauseConfig(after_cycle=1)])
