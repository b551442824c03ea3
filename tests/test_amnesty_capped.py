"""``capped_amnesty_keep``: r is a cap on resurrections, and a resurrection never evicts a better active slot."""

import pytest
import torch

from resu.prune.amnesty import amnesty_keep, capped_amnesty_keep, joint_keep


def _random_case(seed, rows=6, cols=40):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols, generator=g)
    was_pruned = torch.rand(rows, cols, generator=g) < 0.5
    n_keep = (~was_pruned).sum(dim=1)
    return scores, was_pruned, n_keep


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.2, 1.0])
def test_counts_cap_and_no_bad_eviction(seed, budget):
    scores, was_pruned, n_keep = _random_case(seed)
    keep = capped_amnesty_keep(scores, was_pruned, n_keep, budget)
    assert torch.equal(keep.sum(dim=1), n_keep)
    resurrected = (keep & was_pruned).sum(dim=1)
    assert bool((resurrected <= torch.floor(n_keep.double() * budget + 0.5)).all())
    for i in range(scores.shape[0]):
        res = scores[i][keep[i] & was_pruned[i]]
        evicted = scores[i][~keep[i] & ~was_pruned[i]]
        if res.numel() and evicted.numel():
            assert res.min() > evicted.max()  # no resurrected slot replaced a better active one


def test_weak_theta_resurrects_nothing_while_amnesty_forces_its_quota():
    scores, was_pruned, n_keep = _random_case(11)
    scores = torch.where(was_pruned, scores * 0.01, scores + 1.0)  # every θ below every active slot
    keep = capped_amnesty_keep(scores, was_pruned, n_keep, 0.2)
    assert torch.equal(keep, ~was_pruned)
    assert int((amnesty_keep(scores, was_pruned, n_keep, 0.2) & was_pruned).sum()) > 0


def test_full_budget_is_the_joint_ranking():
    scores, was_pruned, n_keep = _random_case(3)
    assert torch.equal(capped_amnesty_keep(scores, was_pruned, n_keep, 1.0), joint_keep(scores, n_keep))


def test_more_places_than_active_slots_go_to_theta():
    scores, was_pruned, _ = _random_case(5)
    n_keep = torch.full((scores.shape[0],), scores.shape[1] - 2)  # densification: keep nearly all
    keep = capped_amnesty_keep(scores, was_pruned, n_keep, 0.0)
    assert torch.equal(keep.sum(dim=1), n_keep)
    assert bool((keep | was_pruned).all())  # every active slot kept


def test_bad_input_raises():
    scores, was_pruned, n_keep = _random_case(0)
    with pytest.raises(ValueError, match="budget"):
        capped_amnesty_keep(scores, was_pruned, n_keep, 1.5)
    with pytest.raises(ValueError, match="2-D"):
        capped_amnesty_keep(scores[0], was_pruned[0], n_keep, 0.1)


def test_commit_strategy_amnesty_capped_keeps_actives_over_tiny_theta():
    import torch.nn as nn

    import resu

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    before = [p.active_mask.clone() for p in (model[0].weight, model[2].weight)]
    resu.enter_resu_(model, epsilon=1e-3)  # θ far below every active weight
    stats = resu.commit_(model, "amnesty_capped", r_start=0.2)
    assert stats.n_resurrected == 0
    assert [torch.equal(p.active_mask, m) for p, m in zip((model[0].weight, model[2].weight), before)] == [True, True]
    resu.enter_resu_(model, epsilon=1e-3)
    assert resu.commit_(model, "amnesty", r_start=0.2).n_resurrected > 0  # the seed's amnesty still forces its quota


def test_pretrained_lm_preset_uses_capped_wanda_commit_and_zero_epsilon():
    from resu.training import pretrained_lm_config
    from resu.training.config import SparsitySchedule

    cfg = pretrained_lm_config(target_sparsity=0.7, initial_sparsity=0.7)
    assert (cfg.commit_strategy, cfg.amnesty_score_type, cfg.resu_epsilon) == ("amnesty_capped", "wanda", 0.0)
    assert cfg.sparsity_schedule is SparsitySchedule.CONSTANT and cfg.sparsity_at(0) == 0.7
    assert sum(cfg.phase_steps()) == cfg.steps_per_cycle
