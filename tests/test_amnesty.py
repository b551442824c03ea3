"""The amnesty tournament, the resurrection budget r(c), and the gradient score."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from resu.prune.amnesty import amnesty_keep, joint_keep, resurrection_budget
from resu.prune.scores import gradient_scores


def test_budget_decays_linearly_from_start_to_end():
    rs = [resurrection_budget(c, 5, 0.10, 0.02) for c in range(5)]
    assert rs[0] == pytest.approx(0.10) and rs[-1] == pytest.approx(0.02)
    diffs = [b - a for a, b in zip(rs, rs[1:])]
    assert diffs == pytest.approx([diffs[0]] * 4) and diffs[0] < 0
    assert resurrection_budget(0, 1, 0.3, 0.1) == 0.3
    assert resurrection_budget(9, 5, 0.3, 0.1) == pytest.approx(0.1)  # past the last cycle: stays at r_end


@pytest.mark.parametrize("kwargs", [dict(r_start=1.5), dict(r_end=-0.1), dict(num_cycles=0), dict(cycle=-1)])
def test_budget_rejects_bad_arguments(kwargs):
    args = dict(cycle=0, num_cycles=3, r_start=0.1, r_end=0.02) | kwargs
    with pytest.raises(ValueError):
        resurrection_budget(**args)


def _reference_row(scores, was_pruned, n_keep, share):
    """Row-at-a-time reference: the stated rule with Python lists."""
    res = sorted([j for j in range(len(scores)) if was_pruned[j]], key=lambda j: (-scores[j], j))
    act = sorted([j for j in range(len(scores)) if not was_pruned[j]], key=lambda j: (-scores[j], j))
    take_r = min(share, len(res))
    take_a = min(n_keep - share, len(act))
    left = n_keep - take_r - take_a
    extra_r = min(left, len(res) - take_r)
    take_r += extra_r
    take_a += left - extra_r
    return set(res[:take_r]) | set(act[:take_a])


@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 24),
    keep_frac=st.floats(0, 1),
    budget=st.floats(0, 1),
    pruned_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_tournament_follows_the_rule(rows, cols, keep_frac, budget, pruned_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols, generator=gen)
    was_pruned = torch.rand(rows, cols, generator=gen) < pruned_frac
    n_keep = torch.full((rows,), int(round(keep_frac * cols)))
    keep = amnesty_keep(scores, was_pruned, n_keep, budget)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep.sum(1), n_keep)
    for i in range(rows):
        chosen = set(keep[i].nonzero().flatten().tolist())
        base = math.floor(int(n_keep[i]) * budget)
        # the row's reserved share is floor(budget · n_keep) or one more (the remainder places)
        assert any(
            _reference_row(scores[i].tolist(), was_pruned[i].tolist(), int(n_keep[i]), share) == chosen
            for share in (base, min(base + 1, int(n_keep[i])))
        ), i


@given(seed=st.integers(0, 2**16), budget=st.floats(0.05, 0.5))
def test_total_resurrected_places_follow_the_budget(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 16, 20
    scores = torch.rand(rows, cols, generator=gen)
    was_pruned = torch.rand(rows, cols, generator=gen) < 0.5
    was_pruned[:, :6] = True  # enough candidates of both kinds for all 6 places of every row
    was_pruned[:, 6:12] = False
    n_keep = torch.full((rows,), 6)
    keep = amnesty_keep(scores, was_pruned, n_keep, budget)
    assert int((keep & was_pruned).sum()) == round(budget * 6 * rows)


def test_short_rows_still_get_resurrections_from_a_small_budget():
    # 2% of 5 kept places is 0.1 per row, but 0.1 · 40 rows = 4 places in all
    scores = torch.rand(40, 12, generator=torch.Generator().manual_seed(0))
    was_pruned = torch.zeros(40, 12, dtype=torch.bool)
    was_pruned[:, 6:] = True
    keep = amnesty_keep(scores, was_pruned, torch.full((40,), 5), 0.02)
    assert int((keep & was_pruned).sum()) == 4
    # the extra places went to the rows whose best candidate scores highest
    best = torch.where(was_pruned, scores, torch.tensor(-1.0)).amax(1)
    winners = (keep & was_pruned).any(1)
    assert best[winners].min() >= best[~winners].max()


def test_resurrected_weights_win_places_even_with_lower_scores():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]])
    was_pruned = torch.tensor([[False] * 4 + [True] * 6])
    keep = amnesty_keep(scores, was_pruned, torch.tensor([4]), 0.5)
    assert keep[0].tolist() == [True, True, False, False, True, True, False, False, False, False]
    # a joint ranking would keep only the old active ones
    assert joint_keep(scores, torch.tensor([4]))[0].tolist() == [True] * 4 + [False] * 6


def test_leftover_places_go_to_the_other_group():
    scores = torch.rand(1, 10, generator=torch.Generator().manual_seed(1))
    was_pruned = torch.tensor([[True] * 8 + [False] * 2])
    keep = amnesty_keep(scores, was_pruned, torch.tensor([6]), 0.1)  # active group has only 2
    assert keep[0, 8:].all() and int(keep.sum()) == 6


def test_tournament_rejects_bad_input():
    s = torch.rand(3, 4)
    with pytest.raises(ValueError, match="n_keep"):
        amnesty_keep(s, s > 0.5, torch.full((3,), 5), 0.1)
    with pytest.raises(ValueError, match="budget"):
        amnesty_keep(s, s > 0.5, torch.full((3,), 2), 1.5)
    with pytest.raises(ValueError, match="same shape"):
        amnesty_keep(s, (s > 0.5)[:, :2], torch.full((3,), 2), 0.1)


def test_gradient_score_is_weight_times_gradient():
    w, g = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(gradient_scores(w, g), (w * g).abs())
    with pytest.raises(ValueError, match="shape"):
        gradient_scores(w, g[:, :3])
