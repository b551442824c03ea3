"""QRESU ops: ``resu::dequant_merge`` (packed codes + θ → effective weight) and ``resu::qlinear``.

A QRESU weight has no dense copy. Its effective weight is rebuilt on the fly: active slots are
dequantized from packed 4/8-bit codes (:mod:`resu.tensors.quantized`), pruned slots take θ (a flat
vector in ascending pruned-slot order). ``dequant_merge`` does that in one pass; on CUDA it is a Triton
kernel (:mod:`resu.compile.triton_qresu`) for every mask encoding, elsewhere the reference below.

``qlinear(x, ...) = F.linear(x, dequant_merge(...), bias)`` is the forward kernel of ``resu::linear``
on a QRESU weight, called below autograd; it has no autograd formula of its own. Its backward is
``resu::linear``'s (:mod:`resu.compile.linear`): the input gradient recomputes the effective weight
(never saved for backward), θ gets a compact gradient gathered from ``gradᵀ·x``.

Quantization parameters are passed as plain values: ``row_stride`` and ``group_cols`` locate the
block of slot ``(r, c)`` at ``r * row_stride + c // group_cols``, and ``decode`` says how a code reads
back (:attr:`QuantFormat.decode`): ``"affine"`` ``(q - zero) * scale``, ``"nf4"`` ``NF4[q] * scale``,
``"nf4_dq"`` the same with 8-bit block scales (see :mod:`resu.tensors.quantized`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resu.compile.registry import define_op
from resu.tensors import mask_kernels as mask_ops
from resu.tensors.quantized import dequantize_flat, unpack


def dequant_merge_reference(
    qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, out_dtype
):
    """Effective weight ``(rows, cols)`` in ``out_dtype``: dequantized codes (fp32) at active slots, θ at pruned."""
    numel = rows * cols
    codes = unpack(qdata, bits, numel)
    w = dequantize_flat(codes, scale, zero, decode, rows, cols, group_cols, row_stride)
    pruned_idx = mask_ops.pruned_flat_indices(storage, encoding, numel, n_pruned)
    w = w.index_copy(0, pruned_idx, theta.float())
    return w.view(rows, cols).to(out_dtype)


def _dequant_merge_cuda(
    qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, out_dtype
):
    from resu.compile.triton_qresu import dequant_merge_triton

    return dequant_merge_triton(
        qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, out_dtype
    )


def _dequant_merge_fake(
    qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, out_dtype
):
    return qdata.new_empty((rows, cols), dtype=out_dtype)


dequant_merge = define_op(
    "dequant_merge(Tensor qdata, Tensor scale, Tensor zero, Tensor theta, Tensor storage, str encoding, "
    "int n_pruned, int rows, int cols, int bits, int group_cols, int row_stride, str decode, ScalarType out_dtype) -> Tensor",
    dequant_merge_reference,
    fake=_dequant_merge_fake,
    cuda=_dequant_merge_cuda,
)


def _compute_dtype(x, compute_dtype):
    return compute_dtype if compute_dtype is not None else x.dtype


def qlinear_reference(
    x, qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, bias,
    compute_dtype,
):
    """``F.linear(x, W_eff, bias)`` in the compute dtype (the autocast dtype if given, else ``x``'s)."""
    dtype = _compute_dtype(x, compute_dtype)
    w = dequant_merge(
        qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, dtype
    )
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))


def _qlinear_fake(
    x, qdata, scale, zero, theta, storage, encoding, n_pruned, rows, cols, bits, group_cols, row_stride, decode, bias,
    compute_dtype,
):
    return x.new_empty((*x.shape[:-1], rows), dtype=_compute_dtype(x, compute_dtype))


qlinear = define_op(
    "qlinear(Tensor x, Tensor qdata, Tensor scale, Tensor zero, Tensor theta, Tensor storage, str encoding, "
    "int n_pruned, int rows, int cols, int bits, int group_cols, int row_stride, str decode, Tensor? bias, "
    "ScalarType? compute_dtype) -> Tensor",
    qlinear_reference,
    fake=_qlinear_fake,
)
