"""resu.commit_: θ merges into the weights and the next mask is chosen by the requested strategy."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import resu
from resu.prune.select import n_to_prune
from tests.helpers import assert_same_snapshot, mlp, snapshot


def _resu_model(seed=0, sparsity=0.6, epsilon=2.0):
    model = resu.sparsify_(mlp(seed=seed))
    resu.prune_(model, sparsity)
    resu.enter_resu_(model, epsilon=epsilon, generator=torch.Generator().manual_seed(seed))
    return model


def _state(model):
    """(merged weight, pruned-before mask) of every ResuParameter, taken in RESU mode."""
    return {
        n: (p.effective_weight().clone(), ~p.active_mask)
        for n, p in model.named_parameters()
        if isinstance(p, resu.ResuParameter)
    }


def _calib(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 12, generator=gen) for _ in range(3)]


@given(seed=st.integers(0, 2**10), sparsity=st.sampled_from([0.3, 0.5, 0.8]), r=st.floats(0, 0.5), cycle=st.integers(0, 4))
def test_amnesty_commit_keeps_merged_values_and_reports_consistent_stats(seed, sparsity, r, cycle):
    model = _resu_model(seed, sparsity)
    before = _state(model)
    stats = resu.commit_(model, "amnesty", cycle=cycle, num_cycles=5, r_start=r, r_end=r / 4)
    assert stats.resurrection_budget == pytest.approx(r + (r / 4 - r) * cycle / 4)
    resurrected = kept = pruned_before = churn = numel = 0
    for name, p in model.named_parameters():
        if not isinstance(p, resu.ResuParameter):
            continue
        merged, old = before[name]
        assert p.mode is resu.ResuMode.SPARSE
        new_active = p.active_mask
        w = p.effective_weight()
        assert torch.equal(w[new_active], merged[new_active])  # θ and active values survive where kept
        assert bool((w[~new_active] == 0).all())
        assert torch.equal(new_active.sum(1), (~old).sum(1))  # default target: the current counts per row
        resurrected += int((old & new_active).sum())
        kept += int((~old & new_active).sum())
        pruned_before += int(old.sum())
        churn += int((old == new_active).sum())
        numel += old.numel()
    assert (stats.n_resurrected, stats.n_active_kept) == (resurrected, kept)
    assert stats.resurrection_rate == pytest.approx(resurrected / pruned_before)
    assert stats.mask_churn == pytest.approx(churn / numel)


def test_target_sparsity_and_global_scope():
    model = _resu_model(3, 0.5)
    resu.commit_(model, target_sparsity=0.75)
    for p in (model[0].weight, model[2].weight):
        assert p.n_pruned == p.shape[0] * n_to_prune(p.shape[1], 0.75)
    resu.enter_resu_(model, epsilon=1.0)
    resu.commit_(model, target_sparsity=0.3, scope="global")
    for p in (model[0].weight, model[2].weight):
        assert p.n_pruned == n_to_prune(p.numel(), 0.3)


def test_amnesty_resurrects_more_than_a_joint_reprune():
    # tiny θ (ε small) never beats trained active weights on magnitude, but amnesty reserves places
    a, b = _resu_model(4, 0.5, epsilon=0.05), _resu_model(4, 0.5, epsilon=0.05)
    joint = resu.commit_(a, "reprune")
    amnesty = resu.commit_(b, "amnesty", r_start=0.2)
    assert joint.n_resurrected == 0
    assert amnesty.n_resurrected == round(0.2 * sum((p.numel() - p.n_pruned) for p in (b[0].weight, b[2].weight)))


def test_simple_merge_keeps_every_slot():
    model = _resu_model(5)
    before = _state(model)
    stats = resu.commit_(model, "simple")
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            assert p.mode is resu.ResuMode.SPARSE and p.n_pruned == 0
            assert torch.equal(p.effective_weight(), before[name][0])
    assert stats.resurrection_rate == 1.0 and stats.sparsity == 0.0


def test_wanda_reprune_ranks_by_weight_times_activation_norm():
    model = _resu_model(6, 0.5)
    calib = _calib()
    merged = _state(model)
    norms = {}
    x = torch.cat(calib)
    with torch.no_grad():
        norms["0.weight"] = x.norm(dim=0)
        norms["2.weight"] = model[1](model[0](x)).norm(dim=0)
    resu.commit_(model, "wanda_reprune", calib=calib)
    for name in ("0.weight", "2.weight"):
        p = model.get_parameter(name)
        score = merged[name][0].abs() * norms[name]
        active = p.active_mask
        # every kept slot scores at least as high as every dropped slot of its row
        for row in range(score.shape[0]):
            assert score[row][active[row]].min() >= score[row][~active[row]].max() - 1e-6


def test_gradient_scores_use_the_loss_gradient_of_the_merged_weights():
    model = _resu_model(7, 0.5)
    calib = _calib(1)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    reference = resu.sparsify_(mlp(seed=7))
    reference.load_state_dict({k: v.effective_weight() if isinstance(v, resu.ResuParameter) else v for k, v in model.state_dict().items()})
    grads = [torch.zeros_like(reference[0].weight.effective_weight()), torch.zeros_like(reference[2].weight.effective_weight())]
    for b in calib:
        g = torch.autograd.grad(loss_fn(reference, b), [reference[0].weight, reference[2].weight])
        grads = [a + c for a, c in zip(grads, g)]
    stats = resu.commit_(model, "reprune", score_type="gradient", calib=calib, loss_fn=loss_fn)
    assert stats.resurrection_budget == 0.0 and stats.n_resurrected > 0
    for p, g, ref in zip((model[0].weight, model[2].weight), grads, (reference[0].weight, reference[2].weight)):
        score = (ref.effective_weight() * g).abs()
        active = p.active_mask
        for row in range(score.shape[0]):
            assert score[row][active[row]].min() >= score[row][~active[row]].max() * (1 - 1e-5)
        assert p.grad is None  # scores are taken without touching .grad


def test_bad_arguments_leave_the_model_unchanged():
    model = _resu_model(8)
    snap = snapshot(model)
    cases = [
        (dict(strategy="greedy"), "strategy"),
        (dict(score_type="hessian"), "score_type"),
        (dict(target_sparsity=1.5), "target_sparsity"),
        (dict(strategy="wanda_reprune"), "calib"),
        (dict(score_type="gradient", calib=_calib()), "loss_fn"),
        (dict(score_type="wanda", calib=[]), "no batches"),
        (dict(strategy="simple", target_sparsity=0.5), "simple"),
        (dict(r_start=2.0), "r_start"),
        (dict(scope="column"), "scope"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            resu.commit_(model, **kwargs)
        assert_same_snapshot(snapshot(model), snap)
    sparse = resu.sparsify_(mlp())
    resu.prune_(sparse, 0.5)
    with pytest.raises(ValueError, match="RESU mode"):
        resu.commit_(sparse)


def test_commit_then_next_cycle_trains():
    model = _resu_model(9)
    resu.commit_(model)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(16, 12)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    resu.enter_resu_(model)
    stats = resu.commit_(model, cycle=1, num_cycles=3)
    assert stats.resurrection_budget == pytest.approx(0.06)
