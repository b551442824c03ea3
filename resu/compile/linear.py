"""``resu::linear`` and its backward ops: the path every ``F.linear`` with a ResuParameter weight takes.

Everything about the op is in this file, top to bottom:

1. the ops on plain tensors: schema, reference kernel (also the CPU and CUDA kernel: the work is a
   matmul, and θ lives in the weight's pruned slots, so the forward needs no gather or scatter) and
   fake implementation; and ``resu::gather_masked``, which the weight gradient uses;
2. the autograd formula (``LinearFunction``);
3. what the ops mean for a ResuParameter: the torch-function entry that routes ``F.linear`` to
   ``LinearFunction`` *above* autograd (so the backward formula is ours rather than aten's), and the
   dispatch-table entries of the three ops. The weight gradient of a RESU/QRESU weight is a compact
   θ gradient (:class:`~resu.tensors.compact_grad.CompactGrad`), of a SPARSE one a masked dense one;
   a QRESU weight's forward is ``resu::qlinear`` over its packed codes.

Autocast does not reach custom ops, so the caller passes the autocast dtype as ``compute_dtype``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from resu.compile.registry import LIB, define_op
from resu.tensors import mask_kernels as mask_ops
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ATEN_OPS, TORCH_FUNCTIONS, ResuParameter, run_without_subclass


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def linear_reference(x, weight, bias, compute_dtype):
    """``F.linear(x, weight, bias)`` with the weight cast to ``compute_dtype`` (the autocast dtype) if given."""
    return F.linear(x, _cast(weight, compute_dtype), bias)


def _linear_fake(x, weight, bias, compute_dtype):
    dtype = compute_dtype or torch.result_type(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


def linear_input_grad_reference(grad_out, weight, compute_dtype):
    """``grad_out @ weight``: the gradient of ``F.linear`` with respect to its input."""
    return grad_out @ _cast(weight, compute_dtype or grad_out.dtype)


def _linear_input_grad_fake(grad_out, weight, compute_dtype):
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D (tokens, features) matrix; also for zero-size tensors, where ``reshape(-1, 0)`` fails."""
    n = 1
    for d in t.shape[:-1]:
        n *= d
    return t.reshape(n, t.shape[-1])


def linear_weight_grad_reference(grad_out, x, weight):
    """``grad_outᵀ @ x`` over all leading dims, in ``weight``'s dtype: the dense weight gradient."""
    return (rows(grad_out).t() @ rows(x)).to(weight.dtype)


def _linear_weight_grad_fake(grad_out, x, weight):
    return weight.new_empty(weight.shape)


linear = define_op(
    "linear(Tensor x, Tensor weight, Tensor? bias, ScalarType? compute_dtype) -> Tensor",
    linear_reference,
    fake=_linear_fake,
)
linear_input_grad = define_op(
    "linear_input_grad(Tensor grad_out, Tensor weight, ScalarType? compute_dtype) -> Tensor",
    linear_input_grad_reference,
    fake=_linear_input_grad_fake,
)
linear_weight_grad = define_op(
    "linear_weight_grad(Tensor grad_out, Tensor x, Tensor weight) -> Tensor",
    linear_weight_grad_reference,
    fake=_linear_weight_grad_fake,
)


# ``resu::gather_masked``: the pruned (or active) slots of a dense tensor as a compact vector; what
# turns ``gradᵀ·x`` into θ's gradient. A custom op so that compiled backward graphs keep it opaque
# (Inductor never sees Triton on a machine without a GPU); on CUDA with a bitmap mask it is the Triton
# kernel of :mod:`resu.compile.triton_bitmap`, elsewhere the reference.
def gather_masked_reference(src, storage, encoding, n_pruned, select_pruned, out_dtype):
    """The pruned (``select_pruned``) or active slots of ``src``, ascending flat order, as ``out_dtype``.

    Reference implementation (every device; index encodings on CUDA too).
    """
    flat = src.reshape(-1)
    if select_pruned:
        out = mask_ops.gather_pruned(flat, storage, encoding, flat.numel(), n_pruned)
    else:
        out = mask_ops.gather_active(flat, storage, encoding, flat.numel(), n_pruned)
    return out.to(out_dtype)


def _gather_masked_cuda(src, storage, encoding, n_pruned, select_pruned, out_dtype):
    if encoding != mask_ops.MaskEncoding.BITMAP:  # a str enum: compares with the op's string
        return gather_masked_reference(src, storage, encoding, n_pruned, select_pruned, out_dtype)
    from resu.compile.triton_bitmap import gather_bitmap

    n_sel = n_pruned if select_pruned else src.numel() - n_pruned
    return gather_bitmap(src.contiguous(), storage, n_sel, select_pruned, out_dtype)


def _gather_masked_fake(src, storage, encoding, n_pruned, select_pruned, out_dtype):
    n_sel = n_pruned if select_pruned else src.numel() - n_pruned
    return src.new_empty((n_sel,), dtype=out_dtype)


gather_masked = define_op(
    "gather_masked(Tensor src, Tensor storage, str encoding, int n_pruned, bool select_pruned, "
    "ScalarType out_dtype) -> Tensor",
    gather_masked_reference,
    fake=_gather_masked_fake,
    cuda=_gather_masked_cuda,
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, compute_dtype = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.compute_dtype = compute_dtype


def _backward(ctx, grad_out):
    if torch.is_grad_enabled():
        # create_graph=True: the backward ops below have no derivative formula of their own.
        raise NotImplementedError(
            "double backward (create_graph=True, e.g. a gradient penalty) through a linear layer with a "
            "ResuParameter weight is not supported; compute the penalty on a model without resu weights"
        )
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_input_grad(grad_out, weight, ctx.compute_dtype)
    if ctx.needs_input_grad[1]:
        grad_w = linear_weight_grad(grad_out, x, weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = rows(grad_out).sum(0)
    return grad_x, grad_w, grad_b, None


torch.library.register_autograd("resu::linear", _backward, setup_context=_setup_context, lib=LIB)


class LinearFunction(torch.autograd.Function):
    """``resu::linear`` with its autograd formula, as a plain ``autograd.Function``.

    ``F.linear`` on a ResuParameter is routed here rather than to the op's registered autograd
    kernel: same forward (the op, called below autograd) and the same backward, with fewer Python
    layers per call. The old-style ``forward(ctx, ...)`` is deliberate: a separate ``setup_context``
    makes ``apply`` bind arguments through ``inspect.signature`` on every call.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype):
        _setup_context(ctx, (x, weight, bias, compute_dtype), None)
        return linear(x, weight, bias, compute_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast would run a matmul in on ``device_type``, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# ---------------------------------------------------------------------- what the ops mean for a ResuParameter
@TORCH_FUNCTIONS.implements([F.linear, torch._C._nn.linear])
def _linear_entry(func, args, kwargs):
    """``F.linear(x, W, b)`` with a ResuParameter ``W``: through ``LinearFunction`` (our backward).

    Autocast does not reach custom ops, so its dtype is read here and passed down."""
    x = args[0] if len(args) > 0 else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(weight, ResuParameter) or isinstance(x, ResuParameter):
        return run_without_subclass(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        dtype = autocast_dtype(x.device.type) if x.dtype != torch.float64 else None
        if dtype is not None:
            x = x.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return LinearFunction.apply(x, weight, bias, dtype)


# The handlers call the plain-tensor reference implementations directly rather than the ops: the
# op (what autograd records) is the unit at the ResuParameter level; below it, a compiled graph then
# holds ordinary aten matmuls that Inductor lowers and fuses itself, with no Python call at run time.
@ATEN_OPS.implements(linear)
def _linear_resu(func, args, kwargs):
    x, weight, bias, dtype = args
    if weight.mode is ResuMode.QRESU:
        return torch.ops.resu.qlinear(x, *weight._quant_op_args(), bias, dtype)
    return linear_reference(x, weight._weight, bias, dtype)


@ATEN_OPS.implements(linear_input_grad)
def _linear_input_grad_resu(func, args, kwargs):
    grad_out, weight, dtype = args
    if weight.mode is ResuMode.QRESU:
        # Recomputed here, never saved from the forward: the effective weight costs one pass over packed codes.
        return linear_input_grad_reference(grad_out, weight._dequant_merge(dtype or grad_out.dtype), None)
    return linear_input_grad_reference(grad_out, weight._weight, dtype)


@ATEN_OPS.implements(linear_weight_grad)
def _linear_weight_grad_resu(func, args, kwargs):
    grad_out, x, weight = args
    layout = weight.resu_layout
    if layout.mode.trains_theta:
        # Gather θ's gradient straight from the matmul result (bf16 under autocast): the dense
        # weight-dtype gradient is never materialized.
        dense = rows(grad_out).t() @ rows(x)
        values = torch.ops.resu.gather_masked(
            dense, weight._mask_storage, layout.encoding_name, layout.n_pruned, True, weight.dtype
        )
        return CompactGrad(values, weight._mask_storage, layout.encoding, weight.shape)
    dense = linear_weight_grad_reference(grad_out, x, weight._weight)
    if layout.mode is ResuMode.SPARSE:
        return weight._zero_pruned_(dense)
    return dense
