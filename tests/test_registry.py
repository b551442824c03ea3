"""The prune-method and commit-strategy registries: adding one is one registration, and prune_,
commit_ and the cycle trainer all find it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.prune.registry import (
    COMMIT_STRATEGIES,
    PRUNE_METHODS,
    CommitStrategy,
    PruneMethod,
    PruneResult,
    register_commit_strategy,
    register_prune_method,
)
from resu.prune.select import lowest_scores
from resu.training.config import RESUConfig
from resu.training.cycle import RESUCycle
from tests.helpers import assert_same_snapshot, mlp, model_in_mode, snapshot


@pytest.fixture
def scratch_registries(monkeypatch):
    """Registrations made by a test are dropped after it."""
    monkeypatch.setattr(PRUNE_METHODS, "_entries", dict(PRUNE_METHODS._entries))
    monkeypatch.setattr(COMMIT_STRATEGIES, "_entries", dict(COMMIT_STRATEGIES._entries))


def _calib(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 12, generator=g) for _ in range(3)]


def test_builtin_entries_are_registered():
    assert {"magnitude", "wanda", "random"} <= set(PRUNE_METHODS.names())
    assert PRUNE_METHODS.get("wanda", "t", "m").statistic == "input_sqnorm"
    assert PRUNE_METHODS.get("magnitude", "t", "m").statistic is None
    assert set(COMMIT_STRATEGIES.names()) >= {"amnesty", "wanda_reprune", "reprune", "simple"}
    assert COMMIT_STRATEGIES.get("amnesty", "t", "s").uses_budget
    assert not COMMIT_STRATEGIES.get("simple", "t", "s").prunes
    assert COMMIT_STRATEGIES.get("wanda_reprune", "t", "s").scoring("magnitude") == "wanda"


def test_unknown_names_list_the_choices():
    model = model_in_mode("dense")
    with pytest.raises(ValueError, match=r"prune_: unknown `method` 'l0'; expected one of 'magnitude', 'wanda', 'random'"):
        resu.prune_(model, 0.5, method="l0")
    model = model_in_mode("resu")
    with pytest.raises(ValueError, match=r"commit_: unknown `strategy` 'x'; expected one of 'amnesty', 'amnesty_capped', 'wanda_reprune'"):
        resu.commit_(model, "x")
    with pytest.raises(ValueError, match="already registered"):
        register_prune_method("magnitude")(lambda w, s, spec: w == 0)


def test_registered_method_gets_a_weight_copy_and_the_gram_statistic(scratch_registries):
    seen = {}

    @register_prune_method("gram_probe", statistic="gram")
    def probe(weight, stat, spec):
        seen.setdefault("weights", []).append(weight.clone())
        seen.setdefault("stats", []).append(stat)
        weight.zero_()  # a copy: writing into it must not reach the model
        return lowest_scores(stat.diagonal().expand_as(weight).clone(), spec.sparsity, spec.scope)

    model = resu.sparsify_(mlp())
    dense = [model[0].weight.effective_weight().clone(), model[2].weight.effective_weight().clone()]
    calib = _calib()
    resu.prune_(model, 0.5, method="gram_probe", calib=calib)
    x = torch.cat(calib)
    with torch.no_grad():
        hidden = model[1](F.linear(x, dense[0], model[0].bias))
    for got, expected in zip(seen["stats"], (x.t() @ x, hidden.t() @ hidden)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for got, w in zip(seen["weights"], dense):
        assert got.dtype == torch.float32 and got.dim() == 2 and torch.equal(got, w)
    for p, w in zip((model[0].weight, model[2].weight), dense):
        active = p.active_mask
        assert torch.equal(p.effective_weight()[active], w[active])  # untouched by the method's writes


def test_registered_method_can_return_reconstructed_weights(scratch_registries):
    @register_prune_method("halve_survivors")
    def halve(weight, stat, spec):
        pruned = lowest_scores(weight.abs(), spec.sparsity, spec.scope)
        return PruneResult(pruned, weight * 0.5)

    model = resu.sparsify_(mlp())
    w = model[0].weight.effective_weight().clone()
    resu.prune_(model, 0.25, method="halve_survivors")
    p = model[0].weight
    pruned = ~p.active_mask
    assert torch.equal(pruned, lowest_scores(w.abs(), 0.25, "row"))
    assert torch.equal(p.effective_weight()[~pruned], w[~pruned] * 0.5)
    assert bool((p.effective_weight()[pruned] == 0).all())


@pytest.mark.parametrize(
    "answer,match",
    [
        (lambda w: torch.zeros(3, dtype=torch.bool), "bool tensor"),
        (lambda w: torch.zeros_like(w), "bool tensor"),
        (lambda w: PruneResult(w == w.max(), torch.full_like(w, float("nan"))), "NaN"),
        (lambda w: PruneResult(w == w.max(), torch.zeros(2)), "weight"),
    ],
)
def test_a_method_with_a_bad_answer_changes_nothing(scratch_registries, answer, match):
    register_prune_method("bad")(lambda weight, stat, spec: answer(weight))
    model = resu.sparsify_(mlp())
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        resu.prune_(model, 0.5, method="bad")
    assert_same_snapshot(before, snapshot(model))


def _keep_resurrected_first(calls):
    def keep(scores, was_pruned, n_keep, budget):
        calls.append(budget)
        # rank resurrected slots above every active one, then by score
        key = scores + was_pruned.float() * (scores.abs().max() + 1)
        order = key.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        return ranks < n_keep[:, None]

    return keep


def test_registered_commit_strategy_is_used_by_commit_(scratch_registries):
    calls = []
    entry = register_commit_strategy("resurrected_first", _keep_resurrected_first(calls), uses_budget=True)
    assert isinstance(entry, CommitStrategy) and entry.prunes
    model = model_in_mode("resu")
    was_pruned = {n: ~p.active_mask for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    stats = resu.commit_(model, "resurrected_first", r_start=0.3)
    assert calls == [0.3, 0.3] and stats.resurrection_budget == 0.3
    for n, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            old = was_pruned[n]
            # every row keeps its active count, and resurrected slots were preferred
            assert torch.equal(p.active_mask.sum(1), (~old).sum(1))
            assert int((p.active_mask & old).sum()) == int(torch.minimum(old.sum(1), (~old).sum(1)).sum())


def test_registered_commit_strategy_is_used_by_the_cycle(scratch_registries):
    calls = []
    register_commit_strategy("resurrected_first", _keep_resurrected_first(calls))
    config = RESUConfig(
        target_sparsity=0.5, num_cycles=1, steps_per_cycle=10, pruning_method="magnitude",
        commit_strategy="resurrected_first", progress_bar=False, calib_batches=2,
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    stats = RESUCycle(model, config, torch.optim.SGD(model.parameters(), lr=0.1),
                      lambda m, b: F.cross_entropy(m(b[0]), b[1])).run(loader)
    assert calls == [0.0, 0.0]  # one call per weight; no budget: the strategy does not use one
    assert stats.n_resurrected > 0


def test_registered_prune_method_is_used_by_the_cycle(scratch_registries):
    seen = []

    @register_prune_method("counting_magnitude", statistic="input_sqnorm")
    def counting(weight, stat, spec):
        seen.append(stat.shape)
        return lowest_scores(weight.abs(), spec.sparsity, spec.scope)

    config = RESUConfig(target_sparsity=0.5, num_cycles=1, steps_per_cycle=10, pruning_method="counting_magnitude",
                        progress_bar=False, calib_batches=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    loader = [(torch.randn(8, 12), torch.randint(0, 3, (8,))) for _ in range(4)]
    RESUCycle(model, config, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: F.cross_entropy(m(b[0]), b[1])).run(loader)
    assert seen == [torch.Size([12]), torch.Size([16])]  # the calibration statistic reached the method


def test_prune_method_entry_wraps_a_bare_mask():
    entry = PruneMethod("m", lambda w, s, spec: w > 0)
    result = entry(torch.tensor([[1.0, -1.0]]), None, None)
    assert isinstance(result, PruneResult) and result.weight is None and result.pruned.tolist() == [[True, False]]


def test_method_result_and_apply_pruning_give_what_prune_gives():
    """The two halves of prune_, for callers that compute statistics themselves (layer by layer)."""
    from resu.api.prune import apply_pruning_, method_result
    from resu.prune.registry import PruneSpec

    a, b = model_in_mode("dense"), model_in_mode("dense")
    calib = _calib()
    resu.prune_(a, 0.5, method="wanda", calib=calib)
    x = torch.cat(calib)
    with torch.no_grad():
        stats = [x.pow(2).sum(0), b[1](b[0](x)).pow(2).sum(0)]
    wanda = PRUNE_METHODS.get("wanda", "test", "method")
    weights = [b[0].weight, b[2].weight]
    results = [method_result(wanda, f"{i}", p, s, PruneSpec(0.5)) for i, p, s in zip((0, 2), weights, stats)]
    assert all(p.mode is resu.ResuMode.DENSE for p in weights)  # computing the results changed nothing
    apply_pruning_(weights, results)
    for p, q in zip(weights, (a[0].weight, a[2].weight)):
        assert torch.equal(p.active_mask, q.active_mask) and torch.equal(p.effective_weight(), q.effective_weight())
