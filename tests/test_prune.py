"""resu.prune_ (resu/api/prune.py): magnitude, random and Wanda masks, per row and per matrix.

Expected masks are computed here from the dense weights with plain torch (argsort, sort, vector norms),
never copied from the library's output.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import resu
from resu import ResuMode, ResuParameter
from tests.models import SharedPair, bits, eff, expected_row_pruned, lm_ids, make_lm, pruned_of, rand_input, random_weight_linear, same_bits


def test_hf_style_model_untied_and_wanda_with_dict_batches():
    model = make_lm(tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resu.sparsify_(model)
    assert type(model.lm_head.weight) is ResuParameter
    emb = bits(model.model.embed_tokens.weight)
    calib = [{"input_ids": lm_ids(s)} for s in range(3)]
    model.train()
    resu.prune_(model, 0.5, method="wanda", calib=calib)
    assert model.training and model.model.layers[0].mlp.training
    for n, p in model.named_parameters():
        if isinstance(p, ResuParameter):
            assert p.mode is ResuMode.SPARSE
            per_row = pruned_of(p).sum(1)
            assert torch.equal(per_row, torch.full_like(per_row, round(0.5 * p.shape[1]))), n
            assert torch.all(eff(p)[pruned_of(p)] == 0), n
    assert torch.equal(bits(model.model.embed_tokens.weight), emb)


# --------------------------------------------------------------------------
# prune_: magnitude
# --------------------------------------------------------------------------



def expected_global_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[scores.reshape(-1).argsort()[:k]] = True
    return flat.view(scores.shape)


def two_layer(seed=0, d_in=40, d_hidden=24, d_out=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.55, 0.9])
def test_magnitude_row_scope(sparsity):
    model = two_layer()
    resu.sparsify_(model)
    dense = {i: model[i].weight.effective_weight().clone() for i in (0, 2)}
    assert resu.prune_(model, sparsity, method="magnitude", scope="row") is model
    for i, w0 in dense.items():
        p = model[i].weight
        out_f, in_f = w0.shape
        k = round(sparsity * in_f)
        assert 0 < k < in_f
        assert p.mode is ResuMode.SPARSE
        assert p.n_pruned == k * out_f
        assert p.sparsity == pytest.approx(k / in_f)
        pruned = pruned_of(p)
        assert torch.equal(pruned.sum(1), torch.full((out_f,), k))
        assert torch.equal(pruned, expected_row_pruned(w0.abs(), k))
        assert torch.equal(~pruned, p.mask.mask)  # SparseMask.mask is True at active slots
        w = eff(p)
        assert torch.all(w[pruned] == 0)
        assert same_bits(w[~pruned], w0[~pruned])
        # every pruned |w| is below every kept |w| of its row
        a = w0.abs()
        low = a.masked_fill(~pruned, -1).amax(1)
        high = a.masked_fill(pruned, float("inf")).amin(1)
        assert torch.all(low < high)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.77])
def test_magnitude_global_scope(sparsity):
    model = two_layer()
    resu.sparsify_(model)
    dense = {i: model[i].weight.effective_weight().clone() for i in (0, 2)}
    resu.prune_(model, sparsity, method="magnitude", scope="global")
    row_counts_differ = False
    for i, w0 in dense.items():
        p = model[i].weight
        k = round(sparsity * w0.numel())
        assert p.n_pruned == k
        pruned = pruned_of(p)
        assert int(pruned.sum()) == k
        assert torch.equal(pruned, expected_global_pruned(w0.abs(), k))
        assert torch.all(eff(p)[pruned] == 0)
        assert same_bits(eff(p)[~pruned], w0[~pruned])
        row_counts_differ |= len(set(pruned.sum(1).tolist())) > 1
    assert row_counts_differ  # global scope really is global


@pytest.mark.parametrize("scope", ["row", "global"])
def test_magnitude_extreme_sparsities(scope):
    model = two_layer()
    resu.sparsify_(model)
    w0 = model[0].weight.effective_weight().clone()
    resu.prune_(model, 0.0, scope=scope)
    p = model[0].weight
    assert p.mode is ResuMode.SPARSE and p.n_pruned == 0
    assert same_bits(eff(p), w0)
    x = rand_input(3, 40)
    resu.prune_(model, 1.0, scope=scope)
    assert p.n_pruned == p.numel()
    assert torch.all(eff(p) == 0)
    with torch.no_grad():
        assert torch.equal(model[0](x), model[0].bias.detach().expand(3, -1))


def test_prune_again_from_sparse_reprunes_from_current_weight():
    model = two_layer()
    resu.sparsify_(model)
    w0 = model[0].weight.effective_weight().clone()
    resu.prune_(model, 0.25)
    resu.prune_(model, 0.5)
    p = model[0].weight
    k = round(0.5 * 40)
    assert torch.equal(pruned_of(p), expected_row_pruned(w0.abs(), k))
    assert p.n_pruned == k * 24


# --------------------------------------------------------------------------
# prune_: random
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.13, 0.5, 0.8])
@pytest.mark.parametrize("scope", ["row", "global"])
def test_random_exact_count_and_reproducible(sparsity, scope):
    masks = []
    for seed in (7, 7, 8):
        model = two_layer()
        resu.sparsify_(model)
        dense = {i: model[i].weight.effective_weight().clone() for i in (0, 2)}
        resu.prune_(model, sparsity, method="random", scope=scope, generator=torch.Generator().manual_seed(seed))
        these = []
        for i, w0 in dense.items():
            p = model[i].weight
            k = round(sparsity * w0.numel())
            pruned = pruned_of(p)
            assert p.n_pruned == k and int(pruned.sum()) == k
            assert torch.all(eff(p)[pruned] == 0)
            assert same_bits(eff(p)[~pruned], w0[~pruned])
            these.append(pruned)
        masks.append(these)
    for a, b in zip(masks[0], masks[1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(masks[0], masks[2]))
    # not the magnitude mask in disguise
    ref = expected_global_pruned(two_layer()[0].weight.detach().abs(), round(sparsity * 40 * 24))
    assert not torch.equal(masks[0][0], ref)


# --------------------------------------------------------------------------
# prune_: wanda
# --------------------------------------------------------------------------


def skewed_batches(n: int, d_in: int, seed: int, tokens: bool = False) -> list[torch.Tensor]:
    """Inputs whose features have very different scales, so Wanda and magnitude disagree."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, d_in)[torch.randperm(d_in, generator=g)]
    shape = (3, 5, d_in) if tokens else (6, d_in)
    return [torch.randn(*shape, generator=g) * scale for _ in range(n)]


def feature_norms(xs) -> torch.Tensor:
    rows = torch.cat([x.reshape(-1, x.shape[-1]).double() for x in xs])
    return torch.linalg.vector_norm(rows, dim=0)


@pytest.mark.parametrize("batch_kind", ["tensor", "tensor_3d", "xy_tuple", "xy_list"])
@pytest.mark.parametrize("scope", ["row", "global"])
def test_wanda_one_layer(batch_kind, scope):
    d_in, d_out, s = 24, 10, 0.4
    model = nn.Sequential(random_weight_linear(d_out, d_in, seed=11))
    resu.sparsify_(model)
    w0 = model[0].weight.effective_weight().clone()
    xs = skewed_batches(3, d_in, seed=12, tokens=batch_kind == "tensor_3d")
    ys = [torch.randn(x.shape[0]) for x in xs]
    if batch_kind == "xy_tuple":
        calib = [(x, y) for x, y in zip(xs, ys)]
    elif batch_kind == "xy_list":
        calib = [[x, y] for x, y in zip(xs, ys)]
    else:
        calib = list(xs)

    resu.prune_(model, s, method="wanda", scope=scope, calib=calib)

    scores = w0.abs().double() * feature_norms(xs)
    if scope == "row":
        k = round(s * d_in)
        expected = expected_row_pruned(scores, k)
        magnitude = expected_row_pruned(w0.abs(), k)
    else:
        k = round(s * d_in * d_out)
        expected = expected_global_pruned(scores, k)
        magnitude = expected_global_pruned(w0.abs(), k)
    assert not torch.equal(expected, magnitude)  # the test can tell Wanda from magnitude
    p = model[0].weight
    assert torch.equal(pruned_of(p), expected)
    assert p.n_pruned == int(expected.sum())
    assert torch.all(eff(p)[expected] == 0)
    assert same_bits(eff(p)[~expected], w0[~expected])


def test_wanda_one_layer_forward_fn_and_generator_calib():
    d_in, d_out, s = 20, 8, 0.5
    model = nn.Sequential(random_weight_linear(d_out, d_in, seed=21))
    resu.sparsify_(model)
    w0 = model[0].weight.effective_weight().clone()
    xs = skewed_batches(4, d_in, seed=22)
    calls = []

    def forward_fn(m, batch):
        calls.append(batch["features"])
        return m(batch["features"])

    calib = ({"features": x, "label": 0} for x in xs)  # a one-shot generator
    resu.prune_(model, s, method="wanda", calib=calib, forward_fn=forward_fn)
    assert len(calls) == 4
    expected = expected_row_pruned(w0.abs().double() * feature_norms(xs), round(s * d_in))
    assert torch.equal(pruned_of(model[0].weight), expected)


def test_wanda_two_layers_uses_dense_activations():
    """The second layer's norms come from the unpruned first layer's output (one calibration pass)."""
    model = two_layer(seed=3, d_in=16, d_hidden=20, d_out=6)
    resu.sparsify_(model)
    w1 = model[0].weight.effective_weight().clone()
    b1 = model[0].bias.detach().clone()
    w2 = model[2].weight.effective_weight().clone()
    xs = skewed_batches(3, 16, seed=31)
    resu.prune_(model, 0.5, method="wanda", calib=xs)
    hidden = [torch.relu(x.double() @ w1.double().t() + b1.double()) for x in xs]
    exp1 = expected_row_pruned(w1.abs().double() * feature_norms(xs), 8)
    exp2 = expected_row_pruned(w2.abs().double() * feature_norms(hidden), 10)
    assert torch.equal(pruned_of(model[0].weight), exp1)
    assert torch.equal(pruned_of(model[2].weight), exp2)


def test_wanda_shared_weight_accumulates_inputs_of_every_use():
    torch.manual_seed(0)
    model = SharedPair()
    resu.sparsify_(model)
    w = model.a.weight.effective_weight().clone()
    b_a = model.a.bias.detach().clone()
    xs = skewed_batches(2, 12, seed=41)
    resu.prune_(model, 0.5, method="wanda", calib=xs)
    inputs_b = [torch.relu(x.double() @ w.double().t() + b_a.double()) for x in xs]
    norms = feature_norms(list(xs) + inputs_b)
    expected = expected_row_pruned(w.abs().double() * norms, 6)
    assert not torch.equal(expected, expected_row_pruned(w.abs().double() * feature_norms(xs), 6))
    assert torch.equal(pruned_of(model.a.weight), expected)


def test_prune_and_enter_resu_clear_gradients():
    model = two_layer()
    resu.sparsify_(model)
    x = rand_input(4, 40)
    model(x).sum().backward()
    assert model[0].weight.grad is not None
    resu.prune_(model, 0.5)
    assert model[0].weight.grad is None and model[2].weight.grad is None
    model(x).sum().backward()
    g = torch.as_tensor(model[0].weight.grad)
    assert torch.all(g[pruned_of(model[0].weight)] == 0)  # SPARSE: no gradient into pruned slots
    assert g[model[0].weight.active_mask].abs().sum() > 0
    resu.enter_resu_(model, 0.1)
    assert model[0].weight.grad is None and model[2].weight.grad is None
