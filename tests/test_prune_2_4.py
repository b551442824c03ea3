"""2:4 semi-structured pruning."""

import pytest
import torch
import torch.nn as nn

import resu
from tests.helpers import snapshot, assert_same_snapshot


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
