"""adopt_zeros_: a checkpoint pruned elsewhere (zeros in a dense file) continues in SPARSE/RESU mode."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load, save

import resu
from resu.api.adopt import adopt_zeros_


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))


def _pruned(p):
    return p._pruned_bool().view(p.shape).clone()


def test_round_trip_through_a_dense_checkpoint():
    source = resu.sparsify_(_net())
    resu.prune_(source, 0.6, method="magnitude")
    masks = [_pruned(p) for p in source.parameters() if isinstance(p, resu.ResuParameter)]
    resu.densify_(source)
    blob = save({k: v.contiguous() for k, v in source.state_dict().items()})  # a plain dense file

    target = _net(seed=1)
    target.load_state_dict(load(blob))
    resu.sparsify_(target)
    assert adopt_zeros_(target) is target
    adopted = [p for p in target.parameters() if isinstance(p, resu.ResuParameter)]
    assert len(adopted) == 2
    for p, mask in zip(adopted, masks):
        assert p.mode is resu.ResuMode.SPARSE
        assert torch.equal(_pruned(p), mask)
    x = torch.randn(5, 24)
    torch.testing.assert_close(target(x), source(x))
    # and it continues into RESU without densifying: θ lives in exactly the adopted slots
    resu.enter_resu_(target, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    for p, mask in zip(adopted, masks):
        assert p.mode is resu.ResuMode.RESU and torch.equal(_pruned(p), mask)


def test_training_keeps_the_adopted_zeros():
    net = resu.sparsify_(_net())
    with torch.no_grad():
        net[0].weight.copy_(net[0].weight.effective_weight() * (torch.rand(32, 24) > 0.5))
    adopt_zeros_(net)
    zeros = _pruned(net[0].weight)
    opt = resu.ResuAdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        net(torch.randn(8, 24)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert (net[0].weight.effective_weight()[zeros] == 0).all()
    assert net[2].weight.mode is resu.ResuMode.DENSE  # no zeros: stays dense


def test_min_sparsity_keeps_chance_zeros_dense():
    net = resu.sparsify_(_net())
    with torch.no_grad():
        w0 = net[0].weight.effective_weight().clone()
        w0[0, :3] = 0.0  # a few zeros by chance: 3 of 768
        net[0].weight.copy_(w0)
        w2 = net[2].weight.effective_weight().clone()
        w2[:, :16] = 0.0  # half pruned
        net[2].weight.copy_(w2)
    adopt_zeros_(net, min_sparsity=0.3)
    assert net[0].weight.mode is resu.ResuMode.DENSE
    assert net[2].weight.mode is resu.ResuMode.SPARSE and net[2].weight.sparsity == 0.5


def test_sparse_weights_keep_their_mask():
    net = resu.sparsify_(_net())
    resu.prune_(net, 0.5, method="magnitude")
    before = _pruned(net[0].weight)
    adopt_zeros_(net)
    assert torch.equal(_pruned(net[0].weight), before)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="sparsify_"):
        adopt_zeros_(_net())
    net = resu.sparsify_(_net())
    with pytest.raises(ValueError, match="min_sparsity"):
        adopt_zeros_(net, min_sparsity=1.5)
    resu.prune_(net, 0.5, method="magnitude")
    resu.enter_resu_(net)
    with pytest.raises(ValueError, match="exit_resu_"):
        adopt_zeros_(net)
    assert net[0].weight.mode is resu.ResuMode.RESU
