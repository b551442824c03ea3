"""resu.sparsify_ and resu.densify_ (resu/api/sparsify.py): converting Linear weights to and from ResuParameters.

Expected values are computed here from the dense weights with plain torch, never copied from the library's output.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu import ResuMode, ResuParameter
from tests.models import LINEARS, PROJ, SharedPair, bits, eff, lm_ids, make_lm, make_net, rand_input, random_weight_linear, same_bits


# --------------------------------------------------------------------------
# sparsify_
# --------------------------------------------------------------------------


def test_sparsify_keeps_modules_values_and_flags():
    model = make_net()
    x = rand_input(5, 16)
    with torch.no_grad():
        ref_out = model(x)
    module_types = [(n, type(m)) for n, m in model.named_modules()]
    old = {n: getattr(model, n).weight for n in LINEARS}
    old_meta = {n: (w.requires_grad, w.shape, w.dtype, w.data_ptr()) for n, w in old.items()}
    old_bits = {n: bits(w) for n, w in old.items()}
    linear_weights = {f"{n}.weight" for n in LINEARS}
    other_params = {n: p for n, p in model.named_parameters() if n not in linear_weights}
    keys = list(model.state_dict().keys())
    n_params = len(list(model.parameters()))

    out = resu.sparsify_(model)

    assert out is model
    assert [(n, type(m)) for n, m in model.named_modules()] == module_types
    for n in LINEARS:
        w = getattr(model, n).weight
        assert type(w) is ResuParameter
        assert isinstance(w, nn.Parameter)
        assert isinstance(w, torch.Tensor)
        assert w.mode is ResuMode.DENSE
        assert w.mask is None and w.n_pruned == 0 and w.sparsity == 0.0
        requires_grad, shape, dtype, ptr = old_meta[n]
        assert w.requires_grad == requires_grad
        assert w.shape == shape and w.dtype == dtype
        assert torch.equal(bits(w.effective_weight()), old_bits[n])
        # the storage is reused, not copied, and the parameter object is kept (contents swapped)
        assert w.effective_weight().data_ptr() == ptr
        assert w is old[n]
        assert dict(model.named_parameters())[f"{n}.weight"] is w
    assert model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert not model.frozen.weight.requires_grad
    # everything else is untouched, same objects
    for n, p in model.named_parameters():
        if n in other_params:
            assert p is other_params[n]
            assert type(p) is nn.Parameter
    assert not model.frozen.bias.requires_grad
    assert list(model.state_dict().keys()) == keys
    assert len(list(model.parameters())) == n_params
    with torch.no_grad():
        assert same_bits(model(x), ref_out)


def test_sparsify_dense_gradients_match_plain_model():
    model = make_net()
    ref = copy.deepcopy(model)
    resu.sparsify_(model)
    x = rand_input(6, 16)
    target = rand_input(6, 8, seed=7)
    for m in (model, ref):
        F.mse_loss(m(x), target).backward()
    for n in ("fc1", "fc2"):
        g = getattr(model, n).weight.grad
        g_ref = getattr(ref, n).weight.grad
        assert g is not None and g_ref.abs().sum() > 0
        torch.testing.assert_close(torch.as_tensor(g), g_ref, rtol=1e-5, atol=1e-6)
    assert model.frozen.weight.grad is None
    torch.testing.assert_close(model.fc1.bias.grad, ref.fc1.bias.grad, rtol=1e-5, atol=1e-6)


def test_sparsify_bare_linear():
    lin = random_weight_linear(7, 9, seed=3)
    w0 = bits(lin.weight)
    x = rand_input(4, 9)
    with torch.no_grad():
        y0 = lin(x)
    assert resu.sparsify_(lin) is lin
    assert type(lin.weight) is ResuParameter and type(lin) is nn.Linear
    assert torch.equal(bits(lin.weight.effective_weight()), w0)
    with torch.no_grad():
        assert same_bits(lin(x), y0)


def test_filter_fn_selects_by_name():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
            "decoder": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)),
            "head": nn.Linear(4, 2),
        }
    )
    seen = []

    def only_encoder(name, module):
        seen.append((name, module))
        return name.startswith("encoder.")

    assert resu.sparsify_(model, filter_fn=only_encoder) is model
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in seen] == linear_names
    assert all(m is model.get_submodule(n) for n, m in seen)
    converted = sorted(n for n, p in model.named_parameters() if isinstance(p, ResuParameter))
    assert converted == ["encoder.0.weight", "encoder.2.weight"]
    for n, p in model.named_parameters():
        if n not in converted:
            assert type(p) is nn.Parameter, n


def test_filter_fn_selects_by_module():
    model = make_net()
    resu.sparsify_(model, filter_fn=lambda name, m: m.in_features >= 24)
    assert type(model.fc1.weight) is nn.Parameter
    assert type(model.fc2.weight) is ResuParameter
    assert type(model.frozen.weight) is ResuParameter
    assert not model.frozen.weight.requires_grad



def test_shared_linear_weight_converted_once_and_stays_shared():
    torch.manual_seed(0)
    model = SharedPair()
    w0 = bits(model.a.weight)
    n_params = len(list(model.parameters()))
    x = rand_input(3, 12)
    with torch.no_grad():
        y0 = model(x)

    resu.sparsify_(model)

    assert model.a.weight is model.b.weight
    assert type(model.a.weight) is ResuParameter
    assert torch.equal(bits(model.a.weight.effective_weight()), w0)
    params = list(model.parameters())
    assert len(params) == n_params
    assert sum(p is model.a.weight for p in params) == 1
    assert sum(isinstance(p, ResuParameter) for p in params) == 2  # shared a/b weight and c
    with torch.no_grad():
        assert same_bits(model(x), y0)

    # pruning sees the shared weight once, and both modules use the pruned weight
    resu.prune_(model, 0.25)
    w = model.a.weight
    assert model.b.weight is w and w.mode is ResuMode.SPARSE
    assert w.n_pruned == 12 * round(0.25 * 12)
    assert model.b.weight.n_pruned == w.n_pruned
    assert torch.equal(model.a.weight.effective_weight(), model.b.weight.effective_weight())


def test_same_linear_module_registered_twice():
    lin = random_weight_linear(6, 6, seed=4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    resu.sparsify_(model)
    assert model[0] is model[2]
    assert type(lin.weight) is ResuParameter
    assert sum(isinstance(p, ResuParameter) for p in model.parameters()) == 1


class TiedToEmbedding(nn.Module):
    def __init__(self, vocab=20, dim=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.body2 = nn.Linear(dim, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(self.body2(torch.relu(self.body(self.emb(ids)))))


def test_linear_tied_to_embedding_is_skipped_with_warning():
    torch.manual_seed(0)
    model = TiedToEmbedding()
    emb_w = model.emb.weight
    emb_bits = bits(emb_w)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(ids)

    with pytest.warns(UserWarning, match="lm_head"):
        assert resu.sparsify_(model) is model

    assert model.lm_head.weight is model.emb.weight is emb_w
    assert type(model.lm_head.weight) is nn.Parameter
    assert torch.equal(bits(emb_w), emb_bits)
    assert type(model.body.weight) is ResuParameter
    assert type(model.body2.weight) is ResuParameter
    with torch.no_grad():
        assert same_bits(model(ids), y0)
    # pruning leaves the tied head alone
    resu.prune_(model, 0.5)
    assert torch.equal(bits(model.emb.weight), emb_bits)
    assert model.body.weight.mode is ResuMode.SPARSE


def test_untied_head_converts_without_warning():
    torch.manual_seed(0)
    model = TiedToEmbedding()
    model.lm_head.weight = nn.Parameter(model.emb.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resu.sparsify_(model)
    assert type(model.lm_head.weight) is ResuParameter
    assert type(model.emb.weight) is nn.Parameter



def test_hf_style_model_converts_in_place_with_identical_outputs():
    model = make_lm(tie=True)
    ids = lm_ids(1)
    with torch.no_grad():
        y0 = model(ids)
    module_ids = {n: id(m) for n, m in model.named_modules()}
    module_types = {n: type(m) for n, m in model.named_modules()}
    weights = {n: bits(p) for n, p in model.named_parameters()}

    with pytest.warns(UserWarning, match="lm_head"):
        assert resu.sparsify_(model) is model

    assert {n: id(m) for n, m in model.named_modules()} == module_ids
    assert {n: type(m) for n, m in model.named_modules()} == module_types
    expected = {f"model.layers.{i}.{proj}.weight" for i in range(2) for proj in PROJ}
    converted = {n for n, p in model.named_parameters() if isinstance(p, ResuParameter)}
    assert converted == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is nn.Parameter
    for n, p in model.named_parameters():
        assert torch.equal(bits(eff(p)), weights[n]), n
        assert p.requires_grad
    with torch.no_grad():
        y1 = model(ids)
    assert y1.abs().sum() > 0
    assert same_bits(y1, y0)


# --------------------------------------------------------------------------
# densify_
# --------------------------------------------------------------------------


def _to_state(model: nn.Module, state: str) -> None:
    if state in ("sparse", "resu", "committed", "uncommitted"):
        resu.prune_(model, 0.5, method="random", generator=torch.Generator().manual_seed(0))
    if state in ("resu", "committed", "uncommitted"):
        resu.enter_resu_(model, 0.3, generator=torch.Generator().manual_seed(1))
    if state == "committed":
        resu.exit_resu_(model, commit=True)
    if state == "uncommitted":
        resu.exit_resu_(model, commit=False)


STATES = ["dense", "sparse", "resu", "committed", "uncommitted"]


@pytest.mark.parametrize("state", STATES)
def test_densify_gives_plain_parameters_with_identical_outputs(state):
    model = make_net()
    resu.sparsify_(model)
    _to_state(model, state)
    x = rand_input(4, 16)
    with torch.no_grad():
        y0 = model(x)
    effective = {n: eff(getattr(model, n).weight).clone() for n in LINEARS}
    module_types = [(n, type(m)) for n, m in model.named_modules()]

    assert resu.densify_(model) is model

    assert [(n, type(m)) for n, m in model.named_modules()] == module_types
    for n in LINEARS:
        w = getattr(model, n).weight
        assert type(w) is nn.Parameter
        assert same_bits(w.detach(), effective[n])
    assert model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert not model.frozen.weight.requires_grad
    assert not any(isinstance(p, ResuParameter) for p in model.parameters())
    with torch.no_grad():
        assert same_bits(model(x), y0)
    # an ordinary model again: a plain optimizer step touches every slot
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().sum().backward()
    before = model.fc2.weight.detach().clone()
    opt.step()
    assert torch.all(model.fc2.weight.detach() != before)


@pytest.mark.parametrize("state", ["dense", "sparse", "resu"])
def test_densify_keeps_shared_and_tied_weights_shared(state):
    torch.manual_seed(0)
    model = SharedPair()
    resu.sparsify_(model)
    _to_state(model, state)
    x = rand_input(3, 12)
    with torch.no_grad():
        y0 = model(x)
    n_params = len(list(model.parameters()))
    resu.densify_(model)
    assert model.a.weight is model.b.weight
    assert type(model.a.weight) is nn.Parameter
    assert len(list(model.parameters())) == n_params
    with torch.no_grad():
        assert same_bits(model(x), y0)

    lm = make_lm(tie=True)
    with pytest.warns(UserWarning):
        resu.sparsify_(lm)
    _to_state(lm, state)
    ids = lm_ids(2)
    with torch.no_grad():
        y0 = lm(ids)
    resu.densify_(lm)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert all(type(p) is nn.Parameter for p in lm.parameters())
    with torch.no_grad():
        assert same_bits(lm(ids), y0)


def test_densify_then_sparsify_round_trip():
    model = make_net()
    resu.sparsify_(model)
    resu.prune_(model, 0.3)
    resu.densify_(model)
    w = {n: eff(getattr(model, n).weight).clone() for n in LINEARS}
    resu.sparsify_(model)  # allowed again after densify_
    for n in LINEARS:
        p = getattr(model, n).weight
        assert type(p) is ResuParameter and p.mode is ResuMode.DENSE
        assert same_bits(eff(p), w[n])


def test_densify_on_plain_model_is_a_no_op():
    model = make_net()
    params = {n: (p, bits(p)) for n, p in model.named_parameters()}
    assert resu.densify_(model) is model
    for n, p in model.named_parameters():
        assert p is params[n][0]
        assert torch.equal(bits(p), params[n][1])
