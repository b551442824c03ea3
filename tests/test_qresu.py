"""QRESU mode end to end: entering and leaving it, forward/backward, ResuAdamW, compile, checkpoints, errors."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import resu
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.quantized import QuantFormat, scale_index
from tests.helpers import mlp

FORMATS = [(4, "per_channel", 128), (8, "per_tensor", 128), (4, "per_group", 8)]


def _values(p):
    return p.effective_weight() if isinstance(p, resu.ResuParameter) else p.detach().clone()


def _pruned_model(sparsity=0.3, seed=0):
    model = resu.sparsify_(mlp(d_in=24, d_hidden=40, d_out=6, seed=seed))
    return resu.prune_(model, sparsity)


def _qresu_model(bits=4, scheme="per_channel", group_size=128, sparsity=0.3, seed=0, epsilon=0.5):
    model = _pruned_model(sparsity, seed)
    before = {n: p.effective_weight().clone() for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    resu.enter_qresu_(model, bits, scheme, group_size, epsilon, generator=torch.Generator().manual_seed(seed))
    return model, before


@pytest.mark.parametrize("bits, scheme, group_size", FORMATS)
def test_enter_qresu_stores_codes_and_flat_theta_and_frees_the_dense_weight(bits, scheme, group_size):
    model, before = _qresu_model(bits, scheme, group_size)
    for name, p in model.named_parameters():
        if not isinstance(p, resu.ResuParameter):
            continue
        assert p.mode is resu.ResuMode.QRESU and p._weight is None
        assert p.quant_format == QuantFormat(bits, scheme, group_size)
        assert p._qdata.dtype == torch.uint8 and p._qdata.numel() == (p.numel() + 1) // 2 if bits == 4 else p.numel()
        assert p._theta.shape == (p.n_pruned,) and p._theta.dtype == torch.float32
        active = p.active_mask
        eff = p.effective_weight()
        # active slots: within half a quantization step of the weights they came from
        scale = p._qscale.reshape(-1)[scale_index(*p.shape, p.quant_format, "cpu")].view(p.shape)
        err = (eff - before[name]).abs()[active]
        assert (err <= scale[active] / 2 * (1 + 1e-5) + 1e-7).all()
        # pruned slots: θ, in ascending order, not all zero (epsilon > 0)
        assert torch.equal(eff[~active], p._theta) and p._theta.abs().sum() > 0


def test_theta_starts_like_resu_theta():
    """Same generator, same ε: QRESU's θ equals the θ enter_resu_ writes into the pruned slots."""
    q, _ = _qresu_model(epsilon=0.3, seed=4)
    r = resu.enter_resu_(_pruned_model(seed=4), epsilon=0.3, generator=torch.Generator().manual_seed(4))
    for pq, pr in zip(q.parameters(), r.parameters()):
        if isinstance(pq, resu.ResuParameter):
            assert torch.equal(pq.theta, pr.theta)


@pytest.mark.parametrize("bits, scheme, group_size", FORMATS)
def test_forward_and_gradients_match_the_effective_weight(bits, scheme, group_size):
    model, _ = _qresu_model(bits, scheme, group_size)
    layer = model[0]
    x = torch.randn(7, 24, requires_grad=True)
    out = layer(x)
    w = layer.weight.effective_weight().requires_grad_(True)
    x2 = x.detach().requires_grad_(True)
    out2 = F.linear(x2, w, layer.bias)
    torch.testing.assert_close(out, out2)
    g = torch.randn_like(out)
    out.backward(g)
    out2.backward(g)
    grad = layer.weight.grad
    assert isinstance(grad, CompactGrad) and grad.values.shape == (layer.weight.n_pruned,)
    torch.testing.assert_close(grad.values, w.grad[~layer.weight.active_mask])
    torch.testing.assert_close(x.grad, x2.grad)


def test_resu_adamw_trains_theta_only_like_adamw_on_the_flat_vector():
    model, _ = _qresu_model(scheme="per_group", group_size=8)
    p = model[0].weight
    frozen = [t.clone() for t in (p._qdata, p._qscale, p._qzero, p._mask_storage)]
    theta_ref = p._theta.detach().clone().requires_grad_(True)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([theta_ref], lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(9, 24, generator=g)).pow(2).mean().backward()
        theta_ref.grad = p.grad.values.clone()
        opt.step()
        ref.step()
    assert torch.equal(p._theta, theta_ref.detach())
    for a, b in zip(frozen, (p._qdata, p._qscale, p._qzero, p._mask_storage)):
        assert torch.equal(a, b)  # bitwise frozen
    assert opt.state[p]["exp_avg"].shape == (p.n_pruned,)


def test_training_lowers_the_loss():
    model, _ = _qresu_model(sparsity=0.6)
    opt = resu.ResuAdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 24, generator=g), torch.randn(64, 6, generator=g)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("commit", [True, False])
def test_exit_qresu(commit):
    model, _ = _qresu_model()
    effective = {n: p.effective_weight() for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    masks = {n: p.active_mask for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    resu.exit_qresu_(model, commit=commit)
    for n, p in model.named_parameters():
        if not isinstance(p, resu.ResuParameter):
            continue
        assert p._qdata is None and p._theta is None
        if commit:
            assert p.mode is resu.ResuMode.DENSE and torch.equal(p.effective_weight(), effective[n])
        else:
            assert p.mode is resu.ResuMode.SPARSE and torch.equal(p.active_mask, masks[n])
            assert torch.equal(p.effective_weight(), effective[n] * masks[n])


def test_compiled_training_with_amp_accumulation_and_clipping_matches_eager():
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, _ = _qresu_model(scheme="per_group", group_size=8, seed=2)
        opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
        run = torch.compile(model, fullgraph=True) if compiled else model
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            opt.zero_grad()
            for _ in range(2):  # gradient accumulation
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = run(torch.randn(8, 24, generator=g)).float().pow(2).mean()
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        runs.append([_values(p) for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_state_dict_round_trips_exactly_through_torch_save():
    model, _ = _qresu_model(bits=8, scheme="per_group", group_size=8)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 24)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = resu.sparsify_(mlp(d_in=24, d_hidden=40, d_out=6, seed=9))
    fresh.load_state_dict(ckpt["model"])
    opt2 = resu.ResuAdamW(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    for a, b in zip(model.parameters(), fresh.parameters()):
        if isinstance(a, resu.ResuParameter):
            assert b.mode is resu.ResuMode.QRESU and b._weight is None and b.quant_format == a.quant_format
            for name in ("_qdata", "_qscale", "_qzero", "_theta", "_mask_storage"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
        else:
            assert torch.equal(a, b)
    x = torch.randn(5, 24)
    for m, o in ((model, opt), (fresh, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(_values(a), _values(b))


def test_moves_copies_and_densify_keep_the_quantized_state():
    model, _ = _qresu_model()
    p = model[0].weight
    eff = p.effective_weight()
    clone = p.clone()
    assert clone.mode is resu.ResuMode.QRESU and clone._qdata.data_ptr() != p._qdata.data_ptr()
    assert torch.equal(clone.effective_weight(), eff)
    model.double()
    assert model[0].weight.mode is resu.ResuMode.QRESU and model[0].weight._theta.dtype == torch.float64
    assert model[0].weight._qdata.dtype == torch.uint8
    torch.testing.assert_close(model[0].weight.effective_weight(), eff.double())
    resu.densify_(model)
    assert type(model[0].weight) is nn.Parameter
    torch.testing.assert_close(model[0].weight.detach(), eff.double())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 2}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"scheme": "per_row"}, "scheme"),
        ({"scheme": "per_group", "group_size": 0}, "group_size"),
        ({"group_size": 64.0}, "group_size"),  # None is the scheme default; a float is refused
        ({"epsilon": -1.0}, "epsilon"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kwargs, match):
    model = _pruned_model()
    before = {n: _values(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        resu.enter_qresu_(model, **kwargs)
    for n, p in model.named_parameters():
        assert torch.equal(_values(p), before[n])
        assert not isinstance(p, resu.ResuParameter) or p.mode is resu.ResuMode.SPARSE


def test_mode_errors_name_the_fix():
    dense = resu.sparsify_(mlp())
    with pytest.raises(ValueError, match="prune_"):
        resu.enter_qresu_(dense)
    with pytest.raises(ValueError, match="enter_qresu_"):
        resu.exit_qresu_(dense)
    model, _ = _qresu_model()
    with pytest.raises(ValueError, match="exit_qresu_"):
        resu.enter_qresu_(model)
    with pytest.raises(ValueError, match="exit_qresu_"):
        resu.prune_(model, 0.5)
    with pytest.raises(ValueError, match="commit"):
        resu.exit_qresu_(model, commit="yes")


def test_writes_and_stock_optimizers_are_refused():
    model, _ = _qresu_model()
    p = model[0].weight
    model(torch.randn(3, 24)).sum().backward()
    with pytest.raises(RuntimeError, match="QRESU"):
        torch.optim.SGD([p], lr=0.1).step()
    with pytest.raises(RuntimeError, match="exit_qresu_"):
        with torch.no_grad():
            p.mul_(2)
    with pytest.raises(RuntimeError, match="QRESU"):
        model[0].load_state_dict({"weight": torch.randn(40, 24), "bias": torch.randn(40)})


@pytest.mark.parametrize("strategy", ["consistency", "magnitude"])
def test_qresu_selective_updates_only_the_selected_theta(strategy):
    from resu.core.selective import SelectionConfig

    config = SelectionConfig(strategy=strategy, k_select_ratio=0.25, tau_stable=0.0)
    model = _pruned_model(0.5)
    resu.enter_qresu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0), selective=config)
    p = model[0].weight
    assert p._selective is config
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    theta0 = p._theta.clone()
    model(torch.randn(16, 24)).pow(2).mean().backward()
    opt.step()
    changed = p._theta != theta0
    k = max(1, round(0.25 * p.n_pruned))
    assert int(changed.sum()) == k  # exactly the selected count; the rest bitwise unchanged
    stats = opt.selection_stats()
    assert stats["n_selected"] >= k and 0 < stats["fraction_selected"] <= 0.25 + 1e-6
    resu.exit_qresu_(model)
    assert getattr(p, "_selective", None) is None


def test_enter_resu_refuses_a_qresu_model():
    model, _ = _qresu_model()
    with pytest.raises(ValueError, match="exit_qresu_"):
        resu.enter_resu_(model)


@given(
    in_f=st.integers(1, 40),
    out_f=st.integers(1, 24),
    sparsity=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, allow_nan=False)),
    fmt=st.sampled_from(FORMATS + [(8, "per_channel", 128), (4, "per_group", 3)]),
    seed=st.integers(0, 1000),
)
def test_property_enter_train_save_exit(in_f, out_f, sparsity, fmt, seed):
    """Random shapes, sparsities (both ends) and formats: bounded error, frozen codes, exact checkpoints."""
    torch.manual_seed(seed)
    layer = resu.prune_(resu.sparsify_(nn.Linear(in_f, out_f)), sparsity, scope="global")
    before = layer.weight.effective_weight().clone()
    resu.enter_qresu_(layer, *fmt, epsilon=0.5, generator=torch.Generator().manual_seed(seed))
    p = layer.weight
    active = p.active_mask
    scale = p._qscale.reshape(-1)[scale_index(out_f, in_f, p.quant_format, "cpu")].view(p.shape)
    assert ((p.effective_weight() - before).abs()[active] <= scale[active] / 2 * (1 + 1e-5) + 1e-7).all()
    codes = p._qdata.clone()
    opt = resu.ResuAdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(3, in_f)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(p._qdata, codes)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = resu.sparsify_(nn.Linear(in_f, out_f))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.weight.effective_weight(), p.effective_weight())
    resu.exit_qresu_(layer, commit=False)
    assert p.mode is resu.ResuMode.SPARSE and torch.equal(p.active_mask, active)
