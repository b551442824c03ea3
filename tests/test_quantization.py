"""Seed quantization utilities and the packed QRESU storage format, on fresh random weights."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from resu.tensors.quantized import QuantFormat, dequantize_codes, pack, quantize_active, scale_index, unpack
from resu.utils import quantization as Q

SCHEMES = ["per_channel", "per_tensor", "per_group"]


def _expanded(scale, shape, fmt):
    """Each slot's scale, weight-shaped."""
    return scale.reshape(-1)[scale_index(*shape, fmt, scale.device)].view(shape)


def _assert_within_half_scale(W, W_hat, scale, fmt):
    bound = _expanded(scale, W.shape, fmt) / 2
    # float rounding of w/scale + zero and of (q - zero)*scale: a few ulps of the values involved
    slack = 4 * torch.finfo(torch.float32).eps * (W.abs() + bound * 2 ** fmt.bits)
    assert ((W_hat - W).abs() <= bound + slack).all()


@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    bits=st.sampled_from([4, 8]),
    scheme=st.sampled_from(SCHEMES),
    group_size=st.integers(1, 130),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_round_trip_error_at_most_half_a_step(rows, cols, bits, scheme, group_size, seed, spread):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread
    W_q, qparams = Q.quantize(W, bits=bits, scheme=scheme, group_size=group_size)
    assert W_q.dtype == torch.uint8 and W_q.shape == W.shape
    assert int(W_q.max()) <= 2**bits - 1
    W_hat = Q.dequantize(W_q, qparams, scheme=scheme)
    _assert_within_half_scale(W, W_hat, qparams["scale"], QuantFormat(bits, scheme, group_size))


@pytest.mark.parametrize("bits", [4, 8])
def test_named_functions_match_generic_ones(bits):
    W = torch.randn(24, 70)
    for scheme, quant, dequant, extra in [
        ("per_channel", Q.quantize_per_channel, Q.dequantize_per_channel, {}),
        ("per_tensor", Q.quantize_per_tensor, Q.dequantize_per_tensor, {}),
        ("per_group", Q.quantize_per_group, Q.dequantize_per_group, {"group_size": 16}),
    ]:
        W_q, scale, zero = quant(W, bits, **extra)
        W_q2, qparams = Q.quantize(W, bits, scheme, **extra)
        assert torch.equal(W_q, W_q2) and torch.equal(scale, qparams["scale"])
        assert torch.equal(dequant(W_q, scale, zero, **extra), Q.dequantize(W_q2, qparams))


def test_scale_shapes_follow_the_scheme():
    W = torch.randn(6, 20)
    assert Q.quantize_per_channel(W)[1].shape == (6,)
    assert Q.quantize_per_tensor(W)[1].shape == ()
    assert Q.quantize_per_group(W, group_size=8)[1].shape == (6, 3)  # the last group has 4 columns


def test_constant_rows_are_stored_exactly():
    W = torch.randn(5, 9)
    W[2] = 0.375
    W_q, scale, zero = Q.quantize_per_channel(W, bits=4)
    assert torch.equal(Q.dequantize_per_channel(W_q, scale, zero)[2], W[2])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("numel", [1, 2, 7, 64, 1001])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == (numel + 1) // 2 if bits == 4 else numel
    assert torch.equal(unpack(packed, bits, numel), codes)


def test_4bit_packing_puts_the_even_code_in_the_low_nibble():
    codes = torch.randint(0, 16, (10,), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert torch.equal(packed & 0xF, codes[0::2]) and torch.equal(packed >> 4, codes[1::2])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_active_quantization_ignores_pruned_slots(scheme):
    W = torch.randn(8, 40)
    pruned = torch.rand(8, 40) < 0.4
    W_outlier = W.clone()
    W_outlier[pruned] = 1e4  # pruned values must not widen any group's range
    fmt = QuantFormat(4, scheme, 16)
    qdata, scale, zero = quantize_active(W_outlier, pruned, fmt)
    qdata_ref, scale_ref, _ = quantize_active(W.masked_fill(pruned, 0.0), pruned, fmt)
    assert torch.equal(scale, scale_ref) and torch.equal(qdata, qdata_ref)
    codes = unpack(qdata, 4, W.numel()).view(W.shape)
    assert (codes[pruned] == 0).all()
    W_hat = dequantize_codes(codes, scale, zero, fmt)
    err = (W_hat - W)[~pruned].abs()
    assert (err <= _expanded(scale, W.shape, fmt)[~pruned] / 2 * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4, "scheme": "per_row"}, "scheme"),
        ({"bits": 4, "scheme": "per_group", "group_size": 0}, "group_size"),
        ({"bits": 4, "scheme": "per_group", "group_size": 2.5}, "group_size"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Q.quantize(torch.randn(4, 4), **kwargs)


def test_bad_tensors_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_per_channel(torch.randn(4))
    with pytest.raises(ValueError, match="floating-point"):
        Q.quantize_per_channel(torch.ones(4, 4, dtype=torch.int64))
    W_q, qparams = Q.quantize(torch.randn(4, 6), scheme="per_channel")
    with pytest.raises(ValueError, match="does not match"):
        Q.dequantize(W_q, qparams, scheme="per_tensor")
    with pytest.raises(ValueError, match="shape"):
        Q.dequantize_per_channel(W_q, qparams["scale"][:2], qparams["zero_point"][:2])
