"""All-or-nothing model operations: a failure injected at any step leaves the model bitwise unchanged.

Each test makes one step fail (a monkeypatched transition on the second weight, a raising loss, a
calibration batch of the wrong shape), checks that the error propagates and that every parameter
keeps its object, mode, mask bytes, weight and θ bits and gradient; then runs the operation again
and checks it gives what it gives on an untouched twin model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import resu
from resu import ResuParameter
from resu.api import qresu_phase, theta_phase
from tests.helpers import assert_same_state, exact_state, fail_on_call, mlp, model_in_mode

STRATEGY_SCORES = [
    ("amnesty", "magnitude"),
    ("amnesty", "wanda"),
    ("amnesty", "gradient"),
    ("reprune", "magnitude"),
    ("reprune", "gradient"),
    ("wanda_reprune", "magnitude"),
    ("simple", "magnitude"),
]


def _calib(seed=0, in_features=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, in_features, generator=g) for _ in range(3)]


def _loss(model, batch):
    return model(batch).pow(2).mean()


def _with_grads(model):
    """Give every weight a gradient (compact in RESU/QRESU mode), so its restoration is checked too."""
    _loss(model, torch.randn(5, 12, generator=torch.Generator().manual_seed(9))).backward()
    assert all(p.grad is not None for p in model.parameters())
    return model


def _commit_kwargs(strategy, score_type, calib):
    return dict(strategy=strategy, score_type=score_type, calib=calib, loss_fn=_loss)




# ---------------------------------------------------------------------- commit_
@pytest.mark.parametrize("mode", ["resu", "qresu"])
@pytest.mark.parametrize("strategy,score_type", STRATEGY_SCORES)
@pytest.mark.parametrize("step", ["merge", "apply_mask"])
def test_commit_failing_midway_leaves_theta_unmerged(monkeypatch, mode, strategy, score_type, step):
    model = _with_grads(model_in_mode(mode))
    before = exact_state(model)
    merge = "_exit_resu_" if mode == "resu" else "_exit_qresu_"
    calls = fail_on_call(monkeypatch, ResuParameter, merge if step == "merge" else "_apply_pruning_")
    kwargs = _commit_kwargs(strategy, score_type, _calib())
    with pytest.raises(RuntimeError, match="injected failure"):
        resu.commit_(model, **kwargs)
    assert len(calls) == 2
    assert_same_state(before, exact_state(model))
    monkeypatch.undo()
    twin = _with_grads(model_in_mode(mode))
    assert resu.commit_(model, **kwargs) == resu.commit_(twin, **kwargs)
    assert_same_state(exact_state(twin), exact_state(model), same_objects=False)


@pytest.mark.parametrize("mode", ["resu", "qresu"])
@pytest.mark.parametrize("strategy", ["amnesty", "reprune"])
def test_commit_with_a_raising_loss_fn_leaves_theta_unmerged(mode, strategy):
    model = _with_grads(model_in_mode(mode))
    before = exact_state(model)
    seen = []

    def loss_fn(m, batch):
        seen.append(1)
        if len(seen) == 2:
            raise KeyError("the loss failed")
        return _loss(m, batch)

    with pytest.raises(KeyError, match="the loss failed"):
        resu.commit_(model, strategy, score_type="gradient", calib=_calib(), loss_fn=loss_fn)
    assert_same_state(before, exact_state(model))
    # a retry still finds the weights in their θ phase
    resu.commit_(model, strategy, score_type="gradient", calib=_calib(), loss_fn=_loss)
    assert all(p.mode is resu.ResuMode.SPARSE for p in model.parameters() if isinstance(p, ResuParameter))


@pytest.mark.parametrize("strategy,score_type", [("amnesty", "gradient"), ("amnesty", "wanda"), ("wanda_reprune", "magnitude")])
def test_commit_with_a_calibration_batch_of_the_wrong_shape_changes_nothing(strategy, score_type):
    model = _with_grads(model_in_mode("resu"))
    before = exact_state(model)
    calib = _calib()[:1] + [torch.randn(4, 7)]  # in_features 7, the model takes 12
    with pytest.raises(RuntimeError):
        resu.commit_(model, **_commit_kwargs(strategy, score_type, calib))
    assert_same_state(before, exact_state(model))


# ---------------------------------------------------------------------- θ phases
@pytest.mark.parametrize(
    "owner,attribute,call",
    [(ResuParameter, "_enter_resu_", 2), (theta_phase, "initial_theta", 2)],
    ids=["enter", "initial_theta"],
)
def test_enter_resu_failing_midway_changes_nothing(monkeypatch, owner, attribute, call):
    model = _with_grads(model_in_mode("sparse"))
    before = exact_state(model)
    calls = fail_on_call(monkeypatch, owner, attribute, call)
    with pytest.raises(RuntimeError, match="injected failure"):
        resu.enter_resu_(model, 0.5, generator=torch.Generator().manual_seed(3))
    assert len(calls) == call
    assert_same_state(before, exact_state(model))
    monkeypatch.undo()
    twin = _with_grads(model_in_mode("sparse"))
    for m in (model, twin):
        resu.enter_resu_(m, 0.5, generator=torch.Generator().manual_seed(3))
    assert_same_state(exact_state(twin), exact_state(model), same_objects=False)


@pytest.mark.parametrize(
    "owner,attribute",
    [(ResuParameter, "_enter_qresu_"), (qresu_phase, "quantize_active"), (theta_phase, "initial_theta")],
    ids=["enter", "quantize", "initial_theta"],
)
def test_enter_qresu_failing_midway_changes_nothing(monkeypatch, owner, attribute):
    model = _with_grads(model_in_mode("sparse"))
    before = exact_state(model)
    fail_on_call(monkeypatch, owner, attribute)
    with pytest.raises(RuntimeError, match="injected failure"):
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4)
    assert_same_state(before, exact_state(model))
    monkeypatch.undo()
    resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4)
    assert all(p.mode is resu.ResuMode.QRESU for p in model.parameters() if isinstance(p, ResuParameter))


# ---------------------------------------------------------------------- prune_ and stabilize_
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "random"])
def test_prune_failing_midway_changes_nothing(monkeypatch, mode, method):
    model = _with_grads(model_in_mode(mode))
    before = exact_state(model)
    fail_on_call(monkeypatch, ResuParameter, "_apply_pruning_")
    kwargs = dict(method=method, calib=_calib(), generator=torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="injected failure"):
        resu.prune_(model, 0.7, **kwargs)
    assert_same_state(before, exact_state(model))
    monkeypatch.undo()
    twin = _with_grads(model_in_mode(mode))
    for m in (model, twin):
        resu.prune_(m, 0.7, **{**kwargs, "generator": torch.Generator().manual_seed(4)})
    assert_same_state(exact_state(twin), exact_state(model), same_objects=False)


def _pruned_with_reference(seed=0):
    model = resu.sparsify_(mlp(seed=seed))
    reference = resu.capture_reference(model)
    resu.prune_(model, 0.6)
    return model, reference


def test_stabilize_failing_midway_changes_nothing(monkeypatch):
    twin, twin_reference = _pruned_with_reference()
    stats = resu.stabilize_(twin, _calib(), reference=twin_reference)
    assert stats.n_swaps > 0 and all(p.grad is None for p in twin.parameters() if isinstance(p, ResuParameter))
    model, reference = _pruned_with_reference()
    before = exact_state(model)
    fail_on_call(monkeypatch, ResuParameter, "_apply_pruning_")
    with pytest.raises(RuntimeError, match="injected failure"):
        resu.stabilize_(model, _calib(), reference=reference)
    assert_same_state(before, exact_state(model))
    monkeypatch.undo()
    assert resu.stabilize_(model, _calib(), reference=reference) == stats
    assert_same_state(exact_state(twin), exact_state(model), same_objects=False)


# ---------------------------------------------------------------------- densify_ and sparsify_
def _fail_second_swap(monkeypatch):
    # a ValueError: swap_tensors' own RuntimeError means "cannot swap" and takes the assignment path
    real = torch.utils.swap_tensors
    calls = []

    def swap(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected failure in swap_tensors")
        return real(a, b)

    monkeypatch.setattr(torch.utils, "swap_tensors", swap)
    return calls


@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "qresu"])
def test_densify_failing_midway_changes_nothing(monkeypatch, mode):
    model = _with_grads(model_in_mode(mode))
    before = exact_state(model)
    calls = _fail_second_swap(monkeypatch)
    with pytest.raises(ValueError, match="injected failure"):
        resu.densify_(model)
    assert len(calls) == 3  # the first swap, the failing second one, and the first one's undo
    assert_same_state(before, exact_state(model))
    monkeypatch.undo()
    resu.densify_(model)
    assert not any(isinstance(p, ResuParameter) for p in model.parameters())


def test_sparsify_failing_midway_changes_nothing(monkeypatch):
    model = mlp()
    _loss(model, torch.randn(5, 12)).backward()
    before = exact_state(model)
    _fail_second_swap(monkeypatch)
    with pytest.raises(ValueError, match="injected failure"):
        resu.sparsify_(model)
    assert_same_state(before, exact_state(model))
    assert all(type(p) is nn.Parameter for p in model.parameters())
