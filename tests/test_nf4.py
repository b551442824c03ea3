"""NF4 as a QRESU scheme: the codebook, nearest-level codes, double-quantized block scales, the
model-level phase, the ops on NF4 arguments (opcheck) and exact save/load round trips.

The Triton kernel on NF4 codes is checked against the reference in ``test_triton_qresu.py`` (its
format list holds NF4 with and without double quantization)."""

import os

import pytest
import torch
import torch.nn.functional as F

import resu
from resu.compile.qlinear import dequant_merge_reference
from resu.io import load_pretrained_, load_safetensors_, save_pretrained, save_safetensors
from resu.tensors.quantized import (
    DOUBLE_QUANT_GROUP,
    QuantFormat,
    block_params,
    block_scales,
    dequantize_codes,
    nf4_codebook,
    quantize_active,
    quantize_codes,
    unpack,
)
from resu.utils.quantization import dequantize, quantize
from tests.helpers import assert_same_state, exact_state, mlp

# The NF4 levels as printed in the QLoRA paper's appendix (4 decimals): the published reference.
PUBLISHED_NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_codebook_matches_the_published_levels():
    levels = nf4_codebook()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    # 4 printed decimals: within half a unit of the last one (plus the fp32 rounding of the published table)
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), atol=6e-5, rtol=0)
    assert levels[7] == 0 and levels[0] == -1 and levels[15] == 1  # exact zero, exact ends
    assert bool((levels[1:] > levels[:-1]).all())


@pytest.mark.parametrize("seed", range(4))
def test_codes_pick_the_nearest_level_times_the_block_absmax(seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols, group = 7, 3 + seed * 37, 16
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    fmt = QuantFormat(4, "nf4", group)
    scale, zero = block_params(w, fmt)
    assert zero.numel() == 0 and scale.shape == (rows, -(-cols // group))
    # scale = absmax of each block, computed here by a plain loop
    for r in range(rows):
        for b in range(scale.shape[1]):
            assert scale[r, b] == w[r, b * group:(b + 1) * group].abs().max()
    codes = quantize_codes(w, scale, zero, fmt)
    levels = nf4_codebook()
    x = w / scale.repeat_interleave(group, dim=1)[:, :cols]
    dist = (x.unsqueeze(-1) - levels).abs()
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.min(-1).values + 1e-7).all())  # the nearest level (ties either way)
    w_hat = dequantize_codes(codes, scale, zero, fmt)
    torch.testing.assert_close(w_hat, levels[codes.long()] * scale.repeat_interleave(group, dim=1)[:, :cols])
    # half the widest gap between levels, in units of the block's absmax, bounds the error
    half_gap = ((levels[1:] - levels[:-1]).max() / 2).item()
    bound = scale.repeat_interleave(group, dim=1)[:, :cols] * half_gap
    assert bool(((w_hat - w).abs() <= bound * (1 + 1e-6)).all())


def test_zero_and_empty_blocks_read_back_as_zero():
    w = torch.zeros(2, 8)
    w[1, :4] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    pruned = torch.zeros(2, 8, dtype=torch.bool)
    pruned[1, 4:] = True  # a block with no active slot
    fmt = QuantFormat(4, "nf4", 4)
    qdata, scale, zero = quantize_active(w, pruned, fmt)
    assert scale.tolist() == [[0.0, 0.0], [2.0, 0.0]]
    values = dequantize_codes(unpack(qdata, 4, 16).view(2, 8), scale, zero, fmt)
    assert torch.equal(values[0], torch.zeros(8))
    assert values[1, 1] == -2.0 and values[1, 3] == 0.0  # ±absmax and 0 are levels: exact


@pytest.mark.parametrize("seed", range(3))
def test_double_quant_stores_8_bit_scales_within_half_a_step(seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols, group = 40, 200, 16  # 40 * 13 = 520 blocks: three groups of 256, the last one short
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    plain = QuantFormat(4, "nf4", group)
    dq = QuantFormat(4, "nf4", group, double_quant=True)
    absmax, _ = block_params(w, plain)
    codes, params = block_params(w, dq)
    n_blocks = absmax.numel()
    assert codes.dtype == torch.uint8 and codes.shape == absmax.shape
    assert params.dtype == torch.float32 and params.shape == (2, -(-n_blocks // DOUBLE_QUANT_GROUP))
    back = block_scales(codes, params, True)
    step = params[0].repeat_interleave(DOUBLE_QUANT_GROUP)[:n_blocks]
    assert bool(((back - absmax.reshape(-1)).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    # the weight's error grows by at most the scale error times the largest level (1)
    err_plain = (dequantize_codes(quantize_codes(w, absmax, _, plain), absmax, _, plain) - w).norm()
    err_dq = (dequantize_codes(quantize_codes(w, codes, params, dq), codes, params, dq) - w).norm()
    assert err_dq <= err_plain * 1.05
    # storage: about 8 bits per block instead of 32
    assert codes.numel() * codes.element_size() + params.numel() * 4 < absmax.numel() * absmax.element_size() / 3


def test_seed_quantize_api_takes_nf4():
    w = torch.randn(6, 50)
    for dq in (False, True):
        q, qparams = quantize(w, bits=4, scheme="nf4", group_size=16, double_quant=dq)
        fmt = QuantFormat(4, "nf4", 16, dq)
        assert torch.equal(dequantize(q, qparams), dequantize_codes(q, qparams["scale"], qparams["zero_point"], fmt))
        assert (dequantize(q, qparams) - w).norm() / w.norm() < 0.15
    with pytest.raises(ValueError, match="bits"):
        quantize(w, bits=8, scheme="nf4")
    with pytest.raises(ValueError, match="double_quant"):
        quantize(w, bits=4, scheme="per_group", double_quant=True)


def _nf4_model(double_quant, seed=0, sparsity=0.4, group_size=8):
    model = resu.sparsify_(mlp(seed=seed))
    resu.prune_(model, sparsity)
    resu.enter_qresu_(model, scheme="nf4", group_size=group_size, double_quant=double_quant, epsilon=0.5,
                      generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("double_quant", [False, True])
def test_enter_qresu_nf4_stores_codes_and_the_forward_uses_them(double_quant):
    dense = resu.sparsify_(mlp(seed=0))
    resu.prune_(dense, 0.4)
    expected = {}
    for name, p in dense.named_parameters():
        if isinstance(p, resu.ResuParameter):
            fmt = QuantFormat(4, "nf4", 8, double_quant)
            q, s, z = quantize_active(p.effective_weight(), ~p.active_mask, fmt)
            expected[name] = (q, s, z, p.active_mask.clone())
    model = _nf4_model(double_quant)
    x = torch.randn(5, 12)
    h = x
    for name, p in model.named_parameters():
        if not isinstance(p, resu.ResuParameter):
            continue
        q, s, z, active = expected[name]
        assert p.quant_format == QuantFormat(4, "nf4", 8, double_quant)
        assert torch.equal(p._qdata, q) and torch.equal(p._qscale, s) and torch.equal(p._qzero, z)
        w = p.effective_weight()
        assert torch.equal(w[~active], p._theta)
        assert torch.equal(w[active], dequantize_codes(unpack(q, 4, w.numel()).view(w.shape), s, z, p.quant_format)[active])
    out = model(x)
    ref = F.linear(F.gelu(F.linear(x, model[0].weight.effective_weight(), model[0].bias)),
                   model[2].weight.effective_weight(), model[2].bias)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert model[0].weight.grad.values.shape == model[0].weight._theta.shape


def test_enter_qresu_nf4_defaults_to_blocks_of_64_and_refuses_bad_combinations():
    model = resu.sparsify_(torch.nn.Sequential(torch.nn.Linear(130, 4)))
    resu.prune_(model, 0.3)
    before = model[0].weight.effective_weight().clone()
    with pytest.raises(ValueError, match="bits=4"):
        resu.enter_qresu_(model, bits=8, scheme="nf4")
    with pytest.raises(ValueError, match="double_quant"):
        resu.enter_qresu_(model, scheme="per_group", double_quant=True)
    with pytest.raises(ValueError, match="double_quant"):
        resu.enter_qresu_(model, scheme="nf4", double_quant=1)
    assert model[0].weight.mode == resu.ResuMode.SPARSE and torch.equal(model[0].weight.effective_weight(), before)
    resu.enter_qresu_(model, scheme="nf4")
    assert model[0].weight.quant_format == QuantFormat(4, "nf4", 64) and model[0].weight._qscale.shape == (4, 3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_merge_and_qlinear_pass_opcheck_on_nf4(double_quant):
    model = _nf4_model(double_quant, group_size=4)
    args = model[0].weight._quant_op_args()
    x = torch.randn(3, 12)
    torch.library.opcheck(torch.ops.resu.dequant_merge.default, (*args, torch.float32))
    torch.library.opcheck(torch.ops.resu.qlinear.default, (x, *args, model[0].bias.detach(), None))
    torch.library.opcheck(torch.ops.resu.qlinear.default, (x.bfloat16(), *args, None, torch.bfloat16))
    assert torch.equal(torch.ops.resu.dequant_merge(*args, torch.float32), dequant_merge_reference(*args, torch.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_model_round_trips_through_safetensors_exactly(tmp_path, double_quant):
    model = _nf4_model(double_quant, seed=2)
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path)
    fresh = resu.sparsify_(mlp(seed=9))
    result = load_safetensors_(fresh, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_state(exact_state(model), exact_state(fresh), same_objects=False)
    for p, q in zip(model.parameters(), fresh.parameters()):
        if isinstance(p, resu.ResuParameter):
            assert p.resu_layout.to_dict() == q.resu_layout.to_dict()
            for attr in ("_qdata", "_qscale", "_qzero", "_theta", "_mask_storage"):
                a, b = getattr(p, attr), getattr(q, attr)
                assert a.dtype == b.dtype and torch.equal(a, b), attr
    x = torch.randn(4, 12)
    assert torch.equal(model(x), fresh(x))


def test_nf4_hugging_face_model_round_trips_through_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, vocab_size=96,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = resu.sparsify_(transformers.AutoModelForCausalLM.from_config(config).eval())
    resu.prune_(model, 0.5)
    resu.enter_qresu_(model, scheme="nf4", group_size=16, double_quant=True, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_pretrained(model, tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    resu.sparsify_(plain)
    load_pretrained_(plain, tmp_path)
    assert_same_state(exact_state(model), exact_state(plain), same_objects=False)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if isinstance(p, resu.ResuParameter):
            assert q.quant_format == QuantFormat(4, "nf4", 16, True), n
            assert torch.equal(p._qscale, q._qscale) and torch.equal(p._qzero, q._qzero), n
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ref)


@pytest.mark.parametrize("fmt", [QuantFormat(4, "nf4", 16, True), QuantFormat(4, "nf4", 7), QuantFormat(4, "per_group", 16),
                                 QuantFormat(8, "per_channel"), QuantFormat(4, "per_tensor")], ids=str)
def test_quantizing_in_row_chunks_gives_the_whole_weight_result(monkeypatch, fmt):
    """quantize_active works through rows in chunks (bounded scratch memory); the result must not depend on it."""
    import resu.tensors.quantized as quantized

    g = torch.Generator().manual_seed(7)
    w = torch.randn(45, 33, generator=g) * torch.rand(45, 1, generator=g)
    pruned = torch.rand(45, 33, generator=g) < 0.3
    scale, zero = block_params(w, fmt, ignore=pruned)
    whole = quantize_codes(w, scale, zero, fmt).reshape(-1).masked_fill(pruned.reshape(-1), 0)
    monkeypatch.setattr(quantized, "CHUNK_SLOTS", 100)  # 45 rows of 33: chunks of 2 rows, then a short one
    assert len(quantized._row_chunks(45, 33, fmt)) == (1 if fmt.scheme == "per_tensor" else 23)
    qdata, s2, z2 = quantize_active(w, pruned, fmt)
    assert torch.equal(s2, scale) and torch.equal(z2, zero)
    assert torch.equal(unpack(qdata, fmt.bits, w.numel()), whole)


def test_nf4_double_quant_model_compiles_fullgraph_with_the_eager_results():
    model = _nf4_model(True, group_size=4)
    x = torch.randn(8, 12)
    eager = model(x)
    eager.sum().backward()
    grad = model[0].weight.grad.values.clone()
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(model[0].weight.grad.values, grad)
