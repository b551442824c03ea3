"""RESUConfig: every seed field, presets, schedules, and clear errors for invalid values."""

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resu.training.config import (
    DensificationSchedule,
    RESUConfig,
    SparsitySchedule,
    aggressive_pruning_config,
    conservative_pruning_config,
    default_config,
    densification_config,
    quick_test_config,
)

SEED_FIELDS = (
    "initial_sparsity target_sparsity sparsity_schedule densify densification_steps num_cycles steps_per_cycle "
    "train_fraction stabilize_fraction resu_fraction resu_lr resu_epsilon freeze_active_during_resu use_selective "
    "selective_beta selective_tau selective_k_select_ratio use_amnesty commit_strategy amnesty_r_start amnesty_r_end "
    "amnesty_score_type pruning_method base_lr weight_decay densification_schedule"
).split()


def test_every_seed_field_exists():
    names = {f.name for f in dataclasses.fields(RESUConfig)}
    assert set(SEED_FIELDS) <= names
    assert {"use_qresu", "qresu_bits", "qresu_scheme"} <= names


def test_presets_match_their_descriptions():
    assert default_config().target_sparsity == 0.7
    aggressive = aggressive_pruning_config()
    assert (aggressive.target_sparsity, aggressive.num_cycles) == (0.9, 7)
    conservative = conservative_pruning_config()
    assert (conservative.target_sparsity, conservative.num_cycles) == (0.5, 3)
    dens = densification_config()
    assert dens.densify and dens.initial_sparsity == 0.7
    targets = [dens.sparsity_at(c) for c in range(dens.num_cycles)]
    assert targets[0] == 0.7 and targets[-1] == 0.0
    assert all(b <= a for a, b in zip(targets, targets[1:]))
    quick = quick_test_config()
    assert quick.num_cycles * quick.steps_per_cycle <= 50
    assert aggressive_pruning_config(num_cycles=3).num_cycles == 3  # presets take overrides


def test_phase_steps_add_up():
    cfg = RESUConfig(steps_per_cycle=97, train_fraction=0.55, stabilize_fraction=0.15, resu_fraction=0.3)
    train, stab, resu_steps = cfg.phase_steps()
    assert train + stab + resu_steps == 97
    assert min(train, stab, resu_steps) >= 0
    assert abs(train - 97 * 0.55) <= 0.5 and abs(stab - 97 * 0.15) <= 0.5


@pytest.mark.parametrize("schedule", list(SparsitySchedule))
def test_sparsity_schedules_reach_the_target(schedule):
    cfg = RESUConfig(initial_sparsity=0.1, target_sparsity=0.83, num_cycles=6, sparsity_schedule=schedule)
    targets = [cfg.sparsity_at(c) for c in range(6)]
    assert targets[-1] == pytest.approx(0.83)
    assert all(b >= a - 1e-12 for a, b in zip(targets, targets[1:]))
    if schedule is SparsitySchedule.LINEAR:
        steps = [b - a for a, b in zip([0.1] + targets, targets)]
        assert steps == pytest.approx([steps[0]] * 6)


def test_densification_schedules():
    stepped = RESUConfig(densify=True, densification_steps=[0.8, 0.4, 0.2], num_cycles=5, initial_sparsity=0.8)
    assert [stepped.sparsity_at(c) for c in range(5)] == [0.8, 0.4, 0.2, 0.2, 0.2]
    linear = RESUConfig(
        densify=True, densification_steps=[0.8, 0.0], num_cycles=5, initial_sparsity=0.8,
        densification_schedule=DensificationSchedule.LINEAR,
    )
    assert [linear.sparsity_at(c) for c in range(5)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_round_trip_through_dict():
    cfg = aggressive_pruning_config(seed=7, sparsity_schedule="cosine")
    assert cfg.sparsity_schedule is SparsitySchedule.COSINE
    assert RESUConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        RESUConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_sparsity=1.5), "target_sparsity"),
        (dict(initial_sparsity=-0.1), "initial_sparsity"),
        (dict(target_sparsity=math.nan), "target_sparsity"),
        (dict(train_fraction=0.7), "sum to 1"),
        (dict(num_cycles=0), "num_cycles"),
        (dict(steps_per_cycle=2.5), "steps_per_cycle"),
        (dict(commit_strategy="greedy"), "commit_strategy"),
        (dict(pruning_method="taylor"), "pruning_method"),
        (dict(amnesty_score_type="hessian"), "amnesty_score_type"),
        (dict(amnesty_r_start=1.2), "amnesty_r_start"),
        (dict(resu_lr=0.0), "resu_lr"),
        (dict(resu_epsilon=-1.0), "resu_epsilon"),
        (dict(selective_beta=1.0), "selective_beta"),
        (dict(densify=True, densification_steps=[0.3, 0.5]), "must not increase"),
        (dict(densification_steps=[0.5, 1.2]), "densification_steps"),
        (dict(sparsity_schedule="exponential"), "sparsity_schedule"),
        (dict(use_selective="yes"), "use_selective"),
        (dict(qresu_bits=3), "qresu_bits"),
        (dict(qresu_bits=4.0), "qresu_bits"),
        (dict(qresu_bits=True), "qresu_bits"),
        (dict(qresu_bits="4"), "qresu_bits"),
        (dict(qresu_group_size=128.0), "qresu_group_size"),
        (dict(calib_batches=2.0), "calib_batches"),
        (dict(pruning_method="2:4"), "pruning_method"),
        (dict(use_qresu=True, freeze_active_during_resu=False), "freeze_active_during_resu"),
    ],
)
def test_invalid_fields_are_rejected_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RESUConfig(**kwargs)


@given(
    st.floats(0, 1, allow_nan=False),
    st.floats(0, 1, allow_nan=False),
    st.floats(0, 1, allow_nan=False),
)
def test_fractions_must_sum_to_one(a, b, c):
    total = a + b + c
    if abs(total - 1.0) <= 1e-6:
        RESUConfig(train_fraction=a, stabilize_fraction=b, resu_fraction=c)
    else:
        with pytest.raises(ValueError, match="sum to 1"):
            RESUConfig(train_fraction=a, stabilize_fraction=b, resu_fraction=c)
    # any split normalized to 1 is accepted
    if total > 0:
        RESUConfig(train_fraction=a / total, stabilize_fraction=b / total, resu_fraction=max(0.0, 1 - a / total - b / total))
