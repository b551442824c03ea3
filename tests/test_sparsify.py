"""The model-level life cycle: sparsify_ → prune_ → enter_resu_ → exit_resu_ → densify_.

Expected masks and values are computed here from the dense weights with plain torch (argsort,
sort, vector norms), never copied from the library's output.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu import ResuMode, ResuParameter

# --------------------------------------------------------------------------
# helpers and models
# --------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def eff(p: torch.Tensor) -> torch.Tensor:
    """The weight a forward uses, as a plain detached tensor."""
    return p.effective_weight() if isinstance(p, ResuParameter) else p.detach()


def pruned_of(p: ResuParameter) -> torch.Tensor:
    return ~p.active_mask


class Net(nn.Module):
    """A few Linear layers (with and without bias, one frozen) next to non-Linear modules."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.fc2 = nn.Linear(64, 24, bias=False)
        self.frozen = nn.Linear(24, 8)
        self.frozen.weight.requires_grad_(False)
        self.frozen.bias.requires_grad_(False)

    def forward(self, x):
        h = F.gelu(self.norm(self.fc1(x)))
        h = self.conv(h.unsqueeze(1)).flatten(1)
        return self.frozen(torch.tanh(self.fc2(h)))


LINEARS = ("fc1", "fc2", "frozen")


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def rand_input(*shape, seed: int = 100) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert x.abs().sum() > 0
    return x


def random_weight_linear(out_f: int, in_f: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


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


class SharedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.c = nn.Linear(12, 6)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


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


# --------------------------------------------------------------------------
# a Hugging Face style decoder
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TinyConfig:
    vocab_size: int = 50
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 16
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True


class TinyAttention(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, h):
        b, t, d = h.shape
        hd = d // self.n_heads

        def heads(z):
            return z.view(b, t, self.n_heads, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(ctx)


class TinyMLP(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h):
        return self.down_proj(F.gelu(self.up_proj(h)))


class TinyBlock(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = TinyAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = TinyMLP(config)

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyModel(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TinyBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1])
        h = self.embed_tokens(input_ids) + self.embed_positions(pos)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class TinyForCausalLM(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))


PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def make_lm(tie: bool = True, seed: int = 0) -> TinyForCausalLM:
    torch.manual_seed(seed)
    return TinyForCausalLM(TinyConfig(tie_word_embeddings=tie))


def lm_ids(seed: int, batch: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed))


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


def expected_row_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = scores.argsort(dim=1)
    out = torch.zeros_like(scores, dtype=torch.bool)
    out.scatter_(1, order[:, :k], True)
    return out


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


# --------------------------------------------------------------------------
# enter_resu_ / exit_resu_
# --------------------------------------------------------------------------


def mask_state(p: ResuParameter):
    return p.mask.encoding, bits(p.mask.storage), p.n_pruned


def same_mask(a, b) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def sparse_big(sparsity=0.5, method="magnitude", seed=0) -> nn.Sequential:
    model = nn.Sequential(random_weight_linear(256, 256, seed=seed))
    resu.sparsify_(model)
    resu.prune_(model, sparsity, method=method, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_enter_resu_theta_statistics(epsilon, method):
    model = sparse_big(0.5, method)
    p = model[0].weight
    w_sparse = eff(p).clone()
    pruned = pruned_of(p)
    mask_before = mask_state(p)
    active = w_sparse[~pruned]

    assert resu.enter_resu_(model, epsilon, generator=torch.Generator().manual_seed(3)) is model

    assert p.mode is ResuMode.RESU
    assert same_mask(mask_state(p), mask_before)
    assert torch.equal(pruned_of(p), pruned)
    w = eff(p)
    theta = w[pruned]
    assert theta.numel() == 256 * 128
    assert torch.all(theta != 0)
    assert same_bits(w[~pruned], w_sparse[~pruned])
    target = epsilon * float(active.std())
    assert float(theta.std()) == pytest.approx(target, rel=0.05)
    assert abs(float(theta.mean())) < 0.05 * target
    # θ is independent noise, not a function of the active weights
    w_dense = random_weight_linear(256, 256, seed=0).weight.detach()  # the weight before pruning
    assert torch.all(w_dense[~pruned] == w_sparse[~pruned])
    assert abs(float(torch.corrcoef(torch.stack([theta, w_dense[pruned]]))[0, 1])) < 0.05


def test_enter_resu_reproducible_with_generator():
    thetas = []
    for seed in (5, 5, 6):
        model = sparse_big()
        resu.enter_resu_(model, 0.1, generator=torch.Generator().manual_seed(seed))
        p = model[0].weight
        thetas.append(eff(p)[pruned_of(p)].clone())
    assert same_bits(thetas[0], thetas[1])
    assert not torch.equal(thetas[0], thetas[2])


def test_enter_resu_zero_epsilon_gives_zero_theta():
    model = sparse_big()
    p = model[0].weight
    w_sparse = eff(p).clone()
    pruned = pruned_of(p)
    resu.enter_resu_(model, 0.0)
    assert p.mode is ResuMode.RESU
    assert torch.all(eff(p)[pruned] == 0)
    assert same_bits(eff(p)[~pruned], w_sparse[~pruned])


def test_enter_resu_shared_weight_once():
    torch.manual_seed(0)
    model = SharedPair()
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, 0.2, generator=torch.Generator().manual_seed(0))
    assert model.a.weight is model.b.weight
    assert model.a.weight.mode is ResuMode.RESU and model.c.weight.mode is ResuMode.RESU


def _resu_model():
    model = sparse_big(0.5, "magnitude")
    p = model[0].weight
    w_sparse = eff(p).clone()
    pruned = pruned_of(p)
    mask_before = mask_state(p)
    resu.enter_resu_(model, 0.1, generator=torch.Generator().manual_seed(4))
    return model, w_sparse, pruned, mask_before


def test_exit_resu_commit_keeps_theta_and_is_dense():
    model, w_sparse, pruned, _ = _resu_model()
    p = model[0].weight
    w_resu = eff(p).clone()
    x = rand_input(5, 256)
    with torch.no_grad():
        y_resu = model(x)

    assert resu.exit_resu_(model, commit=True) is model

    assert model[0].weight is p
    assert p.mode is ResuMode.DENSE
    assert p.mask is None and p.n_pruned == 0 and p.sparsity == 0.0
    assert torch.all(p.active_mask)
    assert same_bits(eff(p), w_resu)
    assert torch.all(eff(p)[pruned] != 0)
    assert same_bits(eff(p)[~pruned], w_sparse[~pruned])
    with torch.no_grad():
        assert same_bits(model(x), y_resu)
    # a committed model can be pruned again; the kept θ takes part in the ranking
    resu.prune_(model, 0.5)
    assert torch.equal(pruned_of(p), expected_row_pruned(w_resu.abs(), 128))


def test_exit_resu_without_commit_returns_to_sparse():
    model, w_sparse, pruned, mask_before = _resu_model()
    p = model[0].weight
    x = rand_input(5, 256)
    with torch.no_grad():
        y_sparse_ref = x @ w_sparse.t() + model[0].bias.detach()

    assert resu.exit_resu_(model, commit=False) is model

    assert p.mode is ResuMode.SPARSE
    assert same_mask(mask_state(p), mask_before)
    assert torch.equal(pruned_of(p), pruned)
    w = eff(p)
    assert torch.all(w[pruned] == 0)
    assert not torch.any(torch.signbit(w[pruned]))  # +0.0, exactly the SPARSE zeros
    assert same_bits(w, w_sparse)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_sparse_ref)
    # and RESU can start again from there
    resu.enter_resu_(model, 0.1)
    assert p.mode is ResuMode.RESU


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
