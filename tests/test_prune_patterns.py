"""N:M semi-structured pruning: ``prune_(pattern="N:M")`` with any method, and ``method="2:4"``."""

import pytest
import torch
import torch.nn as nn

import resu
from tests.helpers import assert_same_snapshot, snapshot


def test_two_smallest_of_every_four_are_pruned():
    torch.manual_seed(0)
    layer = resu.sparsify_(nn.Linear(32, 8))
    w = layer.weight.effective_weight().clone()
    resu.prune_(layer, 0.5, method="2:4")
    pruned = ~layer.weight.active_mask
    groups_w = w.abs().reshape(-1, 4)
    groups_p = pruned.reshape(-1, 4)
    assert torch.all(groups_p.sum(1) == 2)
    for gw, gp in zip(groups_w, groups_p):
        assert gw[gp].max() <= gw[~gp].min()
    assert torch.all(layer.weight.effective_weight()[pruned] == 0)


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_2_4_needs_half_sparsity(sparsity):
    model = resu.sparsify_(nn.Linear(32, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="sparsity"):
        resu.prune_(model, sparsity, method="2:4")
    assert_same_snapshot(before, snapshot(model))


def test_2_4_needs_in_features_divisible_by_4():
    model = resu.sparsify_(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)))
    before = snapshot(model)
    with pytest.raises(ValueError, match="in_features divisible by 4"):
        resu.prune_(model, 0.5, method="2:4")
    assert_same_snapshot(before, snapshot(model))


def _expected_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The n lowest scores of every m consecutive inputs, by a stable sort (plain torch)."""
    groups = scores.reshape(-1, m)
    lowest = groups.argsort(dim=1, stable=True)[:, :n]
    out = torch.zeros_like(groups, dtype=torch.bool)
    out.scatter_(1, lowest, True)
    return out.view(scores.shape)


def _batches(seed=0, d_in=16):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, d_in)  # uneven feature norms: Wanda differs from magnitude
    return [torch.randn(10, d_in, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pattern_prunes_n_lowest_of_every_m(pattern, method):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(1)
    layer = resu.sparsify_(nn.Linear(16, 6))
    w = layer.weight.effective_weight().clone()
    calib = _batches()
    resu.prune_(layer, n / m, method=method, pattern=pattern, calib=calib if method == "wanda" else None)
    scores = w.abs()
    if method == "wanda":
        scores = scores * torch.cat(calib).pow(2).sum(0).sqrt()
    pruned = ~layer.weight.active_mask
    assert torch.equal(pruned.reshape(-1, m).sum(1), torch.full((6 * 16 // m,), n))
    assert torch.equal(pruned, _expected_n_m(scores, n, m))
    assert bool((layer.weight.effective_weight()[pruned] == 0).all())


def test_wanda_pattern_differs_from_magnitude_pattern():
    torch.manual_seed(1)
    a, b = resu.sparsify_(nn.Linear(16, 6)), resu.sparsify_(nn.Linear(16, 6))
    b.load_state_dict(a.state_dict())
    resu.prune_(a, 0.5, method="magnitude", pattern="4:8")
    resu.prune_(b, 0.5, method="wanda", pattern="4:8", calib=_batches())
    assert not torch.equal(a.weight.active_mask, b.weight.active_mask)


def test_random_pattern_prunes_n_of_every_m_reproducibly():
    masks = []
    for _ in range(2):
        layer = resu.sparsify_(nn.Linear(16, 6))
        resu.prune_(layer, 0.25, method="random", pattern="2:8", generator=torch.Generator().manual_seed(3))
        pruned = ~layer.weight.active_mask
        assert torch.equal(pruned.reshape(-1, 8).sum(1), torch.full((12,), 2))
        masks.append(pruned)
    assert torch.equal(masks[0], masks[1])


def test_method_2_4_is_magnitude_with_pattern_2_4():
    torch.manual_seed(2)
    a, b = resu.sparsify_(nn.Linear(32, 8)), resu.sparsify_(nn.Linear(32, 8))
    b.load_state_dict(a.state_dict())
    resu.prune_(a, 0.5, method="2:4")
    resu.prune_(b, 0.5, method="magnitude", pattern="2:4")
    assert torch.equal(a.weight.active_mask, b.weight.active_mask)


@pytest.mark.parametrize("pattern", ["2:4:8", "4:2", "0:4", "4:4", "a:b", "2/4", 2, (2, 4), ""])
def test_bad_patterns_name_the_argument(pattern):
    model = resu.sparsify_(nn.Linear(16, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="pattern"):
        resu.prune_(model, 0.5, pattern=pattern)
    assert_same_snapshot(before, snapshot(model))


def test_pattern_fixes_the_sparsity_and_the_divisibility():
    model = resu.sparsify_(nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 4)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"pass sparsity=0\.5"):
        resu.prune_(model, 0.7, pattern="4:8")
    with pytest.raises(ValueError, match=r"divisible by 8.*`1\.weight`"):
        resu.prune_(model, 0.5, pattern="4:8")
    with pytest.raises(ValueError, match="pattern"):
        resu.prune_(model, 0.5, method="2:4", pattern="2:4")
    assert_same_snapshot(before, snapshot(model))
