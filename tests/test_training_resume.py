"""RESUTrainer.state_dict / load_state_dict: a resumed run ends bitwise equal to an uninterrupted one (CPU)."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import resu
from resu.training.config import RESUConfig
from resu.training.cycle import RESUTrainer


def _loader(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(100, 10, generator=gen)
    y = (x @ torch.randn(10, 4, generator=gen)).argmax(1)
    # shuffled, with a last short batch: the resumed run must land on the same batch of the same epoch order
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def _model():
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Dropout(0.2), nn.Linear(20, 4))


def train_step(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _optimizer(kind, model):
    if kind == "resu":
        return resu.ResuAdamW(model.parameters(), lr=5e-3)
    return torch.optim.Adam(model.parameters(), lr=5e-3)


CONFIG = dict(target_sparsity=0.7, num_cycles=4, steps_per_cycle=9, pruning_method="wanda", progress_bar=False, calib_batches=2,
              resu_lr=5e-3, seed=3)


def _final_state(model):
    return {k: (v.effective_weight() if isinstance(v, resu.ResuParameter) else v).clone() for k, v in model.state_dict().items()}


def _masks(model):
    return [p.active_mask for p in model.parameters() if isinstance(p, resu.ResuParameter)]


def _comparable(stats):
    nan_safe = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return [{k: nan_safe(v) for k, v in s.to_dict().items() if k != "duration_seconds"} for s in stats]


@pytest.mark.parametrize("optimizer_kind", ["resu", "torch"])
def test_resumed_run_matches_uninterrupted_run_bitwise(optimizer_kind):
    loader = _loader()
    torch.manual_seed(0)
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), _optimizer(optimizer_kind, model), train_step)
    trainer.train(loader)
    expected, expected_masks, expected_stats = _final_state(model), _masks(model), _comparable(trainer.stats)

    torch.manual_seed(0)
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), _optimizer(optimizer_kind, model), train_step)
    trainer.train(loader, num_cycles=2)
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    del trainer, model

    torch.manual_seed(999)  # whatever happens in between must not matter
    torch.rand(7)
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), _optimizer(optimizer_kind, model), train_step)
    buffer.seek(0)
    trainer.load_state_dict(torch.load(buffer, weights_only=False))
    assert trainer.cycle == 2 and len(trainer.stats) == 2
    new = trainer.train(_loader_same(loader))
    assert [s.cycle for s in new] == [2, 3]

    final = _final_state(model)
    assert final.keys() == expected.keys()
    for k in expected:
        assert torch.equal(final[k], expected[k]), k
    for a, b in zip(_masks(model), expected_masks):
        assert torch.equal(a, b)
    assert _comparable(trainer.stats) == expected_stats


def _loader_same(loader):
    return loader  # the same loader object (a fresh one built the same way works too)


def test_load_state_dict_rejects_foreign_dicts():
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), torch.optim.SGD(model.parameters(), lr=0.1), train_step)
    with pytest.raises(ValueError, match="version"):
        trainer.load_state_dict({"model": {}})


def test_load_state_dict_warns_about_a_different_config():
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), torch.optim.SGD(model.parameters(), lr=0.1), train_step)
    state = trainer.state_dict()
    other = _model()
    trainer2 = RESUTrainer(other, RESUConfig(**{**CONFIG, "seed": 4}), torch.optim.SGD(other.parameters(), lr=0.1), train_step)
    with pytest.warns(UserWarning, match="config differs"):
        trainer2.load_state_dict(state)


# ---------------------------------------------------------------------- all-or-nothing loading
def _trainer_after(cycles, optimizer_kind="resu"):
    torch.manual_seed(0)
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), _optimizer(optimizer_kind, model), train_step)
    trainer.train(_loader(), num_cycles=cycles)
    return trainer


def _trainer_view(trainer):
    """What load_state_dict may change: counters, stats, model, optimizer state, RNG states."""
    opt = trainer.optimizer.state_dict()
    return (
        trainer.cycle,
        _comparable(trainer.stats),
        {k: v.clone() for k, v in _final_state(trainer.model).items()},
        [m.clone() for m in _masks(trainer.model)],
        {pid: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for pid, s in opt["state"].items()},
        trainer.generator.get_state().clone(),
        torch.get_rng_state().clone(),
        trainer._pending_stream_state,
    )


def _assert_same_view(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[7] == b[7]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert len(a[3]) == len(b[3]) and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    assert a[4].keys() == b[4].keys()
    for pid in a[4]:
        assert a[4][pid].keys() == b[4][pid].keys()
        for k in a[4][pid]:
            x, y = a[4][pid][k], b[4][pid][k]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert torch.equal(a[5], b[5]) and torch.equal(a[6], b[6])


def _corrupt(state, path, value):
    state = dict(state)
    if len(path) == 1:
        state[path[0]] = value
    else:
        state[path[0]] = _corrupt(state[path[0]], path[1:], value)
    return state


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("cycle",), -1, "'cycle'"),
        (("cycle",), "2", "'cycle'"),
        (("cycle",), 2.0, "'cycle'"),
        (("stats",), [{"cycle": 0}], "'stats'"),
        (("stats",), "stats", "'stats'"),
        (("generator",), torch.zeros(3, dtype=torch.uint8), "'generator'"),
        (("torch_rng",), torch.zeros(5), "'torch_rng'"),
        (("stream",), {"epoch": 0}, "'stream'"),
        (("stream", "position"), -3, "'stream.position'"),
        (("model", "0.weight"), torch.zeros(3, 3), "'model'"),
        (("model",), {}, "'model'"),
        (("optimizer", "param_groups"), [], "'optimizer'"),
        (("optimizer",), {"state": {}}, "'optimizer'"),
    ],
    ids=repr,
)
def test_a_bad_field_is_refused_before_anything_changes(path, value, match):
    saved = copy.deepcopy(_trainer_after(2).state_dict())
    trainer = _trainer_after(1)
    before = _trainer_view(trainer)
    with pytest.raises(ValueError, match=match):
        trainer.load_state_dict(_corrupt(saved, path, value))
    _assert_same_view(before, _trainer_view(trainer))


def test_a_missing_field_is_refused():
    saved = _trainer_after(1).state_dict()
    trainer = _trainer_after(1)
    del saved["optimizer"]
    with pytest.raises(ValueError, match="lacks"):
        trainer.load_state_dict(saved)


@pytest.mark.parametrize("optimizer_kind", ["resu", "torch"])
def test_an_optimizer_that_fails_to_load_leaves_model_and_trainer_unchanged(monkeypatch, optimizer_kind):
    saved = copy.deepcopy(_trainer_after(2, optimizer_kind).state_dict())
    trainer = _trainer_after(1, optimizer_kind)
    before = _trainer_view(trainer)
    real = trainer.optimizer.load_state_dict
    calls = []

    def failing(state):
        calls.append(1)
        if len(calls) == 1:  # the load fails after the model was loaded; the restore goes through
            raise RuntimeError("optimizer state rejected")
        return real(state)

    monkeypatch.setattr(trainer.optimizer, "load_state_dict", failing)
    with pytest.raises(RuntimeError, match="optimizer state rejected"):
        trainer.load_state_dict(saved)
    assert len(calls) == 2
    _assert_same_view(before, _trainer_view(trainer))
    monkeypatch.undo()
    trainer.load_state_dict(saved)  # and a later good load works
    assert trainer.cycle == 2


def test_resuming_with_a_shorter_loader_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = _model()
    trainer = RESUTrainer(model, RESUConfig(**CONFIG), _optimizer("resu", model), train_step)
    loader = _loader()
    trainer.train(loader, num_cycles=3)
    saved = copy.deepcopy(trainer.state_dict())  # a live state dict shares the optimizer's tensors
    assert saved["stream"]["position"] > 2
    short = [next(iter(_loader()))] * 2  # two batches per pass

    def resumed_run(fail_first: bool):
        model = _model()
        resumed = RESUTrainer(model, RESUConfig(**CONFIG), _optimizer("resu", model), train_step)
        resumed.load_state_dict(copy.deepcopy(saved))
        if fail_first:
            rng = torch.get_rng_state().clone()
            with pytest.raises(ValueError, match=r"yields 2 batches per pass, but the saved position is batch \d+"):
                resumed.train(short, num_cycles=1)
            assert torch.equal(torch.get_rng_state(), rng)
            assert resumed.cycle == 3 and len(resumed.stats) == 3
        resumed.train(loader, num_cycles=1)  # the saved position is still pending: the right loader resumes
        return _final_state(model), _comparable(resumed.stats)

    (weights_a, stats_a), (weights_b, stats_b) = resumed_run(True), resumed_run(False)
    assert stats_a == stats_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_b)
