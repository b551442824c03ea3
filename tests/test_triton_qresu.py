"""The QRESU dequant+merge Triton kernel against its PyTorch reference, and the ops' registrations.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set by conftest); ``pytest -m cuda`` runs the same
cases compiled on a GPU.
"""

import pytest
import torch

from resu.compile.qlinear import dequant_merge_reference, qlinear_reference
from resu.tensors import mask as mask_ops
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.layout import ResuLayout
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import QuantFormat, quantize_active
from resu.tensors.resu_parameter import ResuParameter

triton_qresu = pytest.importorskip("resu.compile.triton_qresu")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
FORMATS = [QuantFormat(4, "per_channel"), QuantFormat(8, "per_tensor"), QuantFormat(4, "per_group", 16), QuantFormat(8, "per_group", 7),
           QuantFormat(4, "nf4", 8), QuantFormat(4, "nf4", 5, double_quant=True)]
ENCODINGS = list(mask_ops.MaskEncoding)


def _case(shape, sparsity, encoding, fmt, device, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    numel = rows * cols
    k = int(round(sparsity * numel))
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=g)[:k]] = True
    w = torch.randn(shape, generator=g)
    storage = mask_ops._encode_as(pruned.view(shape), encoding)
    qdata, scale, zero = quantize_active(w, pruned, fmt)
    theta = torch.randn(k, generator=g)
    args = (qdata, scale, zero, theta, storage, encoding.value, k, rows, cols, fmt.bits, fmt.group_cols(cols), fmt.row_stride(cols),
            fmt.decode)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), pruned.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.value)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (33, 65), (17, 300), (5, 64), (9, 40)])  # cols % 8 == 0: per-row scales
@pytest.mark.parametrize("sparsity", [0.0, 0.02, 0.5, 0.98, 1.0])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_dequant_merge_matches_reference(device, encoding, shape, sparsity, fmt):
    args, pruned = _case(shape, sparsity, encoding, fmt, device, seed=hash((shape, sparsity, str(fmt))) % 10_000)
    for dtype in (torch.float32, torch.bfloat16):
        got = triton_qresu.dequant_merge_triton(*args, dtype)
        ref = dequant_merge_reference(*args, dtype)
        assert got.dtype == ref.dtype == dtype and got.shape == shape
        assert torch.equal(got, ref), dtype
    # θ lands in the pruned slots, in ascending order
    assert torch.equal(dequant_merge_reference(*args, torch.float32).reshape(-1)[pruned], args[3])


@pytest.mark.cuda
@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.value)
def test_dequant_merge_half_output_on_cuda(encoding):
    args, _ = _case((64, 129), 0.5 if encoding is mask_ops.MaskEncoding.BITMAP else 0.01, encoding, FORMATS[2], "cuda", 3)
    assert torch.equal(triton_qresu.dequant_merge_triton(*args, torch.float16), dequant_merge_reference(*args, torch.float16))


def _qlinear_inputs(device, bias=True):
    args, pruned = _case((12, 40), 0.4, mask_ops.MaskEncoding.BITMAP, QuantFormat(4, "per_group", 16), device, 11)
    x = torch.randn(3, 5, 40, device=device, requires_grad=True)
    theta = args[3].clone().requires_grad_(True)
    b = torch.randn(12, device=device, requires_grad=True) if bias else None
    return x, args[:3] + (theta,) + args[4:], b, pruned


@pytest.mark.parametrize("device", DEVICES)
def test_qresu_linear_gradients_match_autograd_on_the_effective_weight(device):
    """The one QRESU backward (resu::linear's, with qlinear as the forward kernel) against plain autograd."""
    x, args, b, pruned = _qlinear_inputs(device)
    fmt = QuantFormat(4, "per_group", 16)
    layout = ResuLayout(ResuMode.QRESU, args[5], args[6], fmt)
    inner = {"_qdata": args[0], "_qscale": args[1], "_qzero": args[2], "_theta": args[3].detach(), "_mask_storage": args[4]}
    weight = ResuParameter(layout, inner, shape=(args[7], args[8]), requires_grad=True)
    out = torch.nn.functional.linear(x, weight, b)
    g = torch.randn_like(out)
    gx, gweight, gb = torch.autograd.grad(out, (x, weight, b), g)
    # reference: the effective weight as a dense leaf, plain autograd
    w = dequant_merge_reference(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args], torch.float32)
    w.requires_grad_(True)
    x2, b2 = x.detach().requires_grad_(True), b.detach().requires_grad_(True)
    out2 = torch.nn.functional.linear(x2, w, b2)
    gx2, gw2, gb2 = torch.autograd.grad(out2, (x2, w, b2), g)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gb, gb2)
    assert isinstance(gweight, CompactGrad)  # compact: one value per θ, no dense weight gradient
    torch.testing.assert_close(gweight.values, gw2.reshape(-1)[pruned])


def test_qlinear_and_dequant_merge_pass_opcheck():
    x, args, b, _ = _qlinear_inputs("cpu")
    # qlinear runs below autograd (the forward kernel of resu::linear on a QRESU weight): no grad inputs.
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.resu.qlinear.default, (x.detach(), *plain, b.detach(), None))
    torch.library.opcheck(torch.ops.resu.qlinear.default, (x.detach().bfloat16(), *plain, None, torch.bfloat16))
    torch.library.opcheck(torch.ops.resu.dequant_merge.default, (*plain, torch.bfloat16))


def test_qlinear_reference_computes_in_the_compute_dtype():
    x, args, b, _ = _qlinear_inputs("cpu")
    with torch.no_grad():
        out = qlinear_reference(x, *args, b, torch.bfloat16)
    assert out.dtype == torch.bfloat16


# Shapes and launch settings that reach each compile-time path of the kernel, with the path each must
# take: (shape, format, block, num_warps, scale mode, bounds). Bounds: whole programs (no masks), whole
# tile rows (row masks), partial rows (slot masks). Settings with fewer tile rows than threads, one row
# per thread and several rows per thread are all present.
T = triton_qresu
PATH_CASES = [
    ((8, 64), QuantFormat(4, "per_channel"), 64, 1, T.SCALE_FLAT_PROGRAM, T.BOUNDS_NONE),
    ((8, 64), QuantFormat(4, "per_group", 16), 64, 1, T.SCALE_FLAT_ROW, T.BOUNDS_NONE),
    ((16, 128), QuantFormat(4, "per_group", 32), 512, 1, T.SCALE_FLAT_ROW, T.BOUNDS_NONE),
    ((16, 128), QuantFormat(8, "per_channel"), 128, 4, T.SCALE_FLAT_PROGRAM, T.BOUNDS_NONE),
    ((8, 64), QuantFormat(4, "nf4", 16, double_quant=True), 32, 1, T.SCALE_FLAT_ROW, T.BOUNDS_NONE),
    ((8, 64), QuantFormat(4, "nf4", 64, double_quant=True), 32, 1, T.SCALE_FLAT_PROGRAM, T.BOUNDS_NONE),
    ((8, 40), QuantFormat(4, "nf4", 8), 128, 1, T.SCALE_FLAT_ROW, T.BOUNDS_ROW),
    ((6, 40), QuantFormat(4, "per_group", 16), 32, 1, T.SCALE_ROW, T.BOUNDS_ROW),
    ((7, 24), QuantFormat(8, "per_group", 16), 16, 2, T.SCALE_ROW, T.BOUNDS_ROW),
    ((5, 13), QuantFormat(4, "per_group", 4), 32, 1, T.SCALE_SLOT, T.BOUNDS_SLOT),
    ((4, 32), QuantFormat(8, "per_tensor"), 16, 1, T.SCALE_TENSOR, T.BOUNDS_NONE),
    ((3, 7), QuantFormat(4, "per_tensor"), 16, 1, T.SCALE_TENSOR, T.BOUNDS_SLOT),
]


def _at_odd_address(t):
    """A copy of ``t`` whose data starts one byte past an aligned address (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:]
    out.copy_(t)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.value)
@pytest.mark.parametrize("case", range(len(PATH_CASES)))
@pytest.mark.parametrize("variant", ["plain", "odd_qdata", "bf16_theta"])
def test_dequant_merge_launch_paths_match_reference(device, encoding, case, variant):
    """Bit for bit against the reference on every path: scale lookup, bounds masking, 4-bit codes read as
    aligned words or as bytes (codes at an odd address), fp32 and bf16 θ (the θ load falls back to the
    dequantized value only for fp32 θ), at block/warp settings other than the defaults."""
    shape, fmt, block, warps, scale_mode, bounds = PATH_CASES[case]
    args, pruned = _case(shape, 0.5, encoding, fmt, device, seed=case)
    if variant == "odd_qdata":
        args = (_at_odd_address(args[0]),) + args[1:]
    if variant == "bf16_theta":
        args = args[:3] + (args[3].bfloat16(),) + args[4:]
    plan = triton_qresu._plan_for(*args[5:6], *args[7:13], torch.float32, block, warps, args[0].data_ptr() % 4 == 0)
    assert (plan.scale_mode, plan.bounds) == (scale_mode, bounds)
    assert plan.code_words == (fmt.bits == 4 and variant != "odd_qdata" and shape[0] * shape[1] % 8 == 0)
    for dtype in (torch.float32, torch.bfloat16):
        got = triton_qresu.dequant_merge_triton(*args, dtype, block=block, num_warps=warps)
        ref = dequant_merge_reference(*args, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got.view(torch.int32 if dtype == torch.float32 else torch.int16),
                           ref.view(torch.int32 if dtype == torch.float32 else torch.int16))
    assert torch.equal(got.reshape(-1)[pruned], args[3].bfloat16())  # θ in the pruned slots, in order


@pytest.mark.parametrize("bad", [dict(block=100), dict(block=8), dict(num_warps=3), dict(num_warps=0), dict(block=64.0)])
def test_dequant_merge_refuses_launch_settings_that_are_not_powers_of_two(bad):
    args, _ = _case((4, 32), 0.5, mask_ops.MaskEncoding.BITMAP, FORMATS[0], "cpu", 0)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        triton_qresu.dequant_merge_triton(*args, torch.float32, **bad)


def test_launch_defaults_come_from_the_environment(monkeypatch):
    """RESU_QRESU_QBLOCK / RESU_QRESU_NUM_WARPS set the defaults (read at import); a bad value is an
    error naming the variable, not a silent fallback."""
    monkeypatch.setenv("RESU_QRESU_QBLOCK", "2048")
    assert triton_qresu._setting_from_env("RESU_QRESU_QBLOCK", 1024, 16) == 2048
    monkeypatch.delenv("RESU_QRESU_QBLOCK")
    assert triton_qresu._setting_from_env("RESU_QRESU_QBLOCK", 1024, 16) == 1024
    for raw in ("1000", "eight", "0"):
        monkeypatch.setenv("RESU_QRESU_NUM_WARPS", raw)
        with pytest.raises(ValueError, match="RESU_QRESU_NUM_WARPS"):
            triton_qresu._setting_from_env("RESU_QRESU_NUM_WARPS", 2, 1)
