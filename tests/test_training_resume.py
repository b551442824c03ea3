"""RESUTrainer.state_dict / load_state_dict: a resumed run ends bitwise equal to an uninterrupted one (CPU)."""

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
