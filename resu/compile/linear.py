"""``resu::linear`` and its backward ops: the path every ``F.linear`` with a ResuParameter weight takes.

``ResuParameter.__torch_function__`` routes ``F.linear`` here *above* autograd, so the backward formula
is ours rather than aten's: the weight gradient goes through ``resu::linear_weight_grad``, which a
ResuParameter intercepts in ``__torch_dispatch__`` to return a compact θ gradient (RESU) or a masked
dense one (SPARSE). On plain tensors each op is the dense reference implementation below, which is
also the CPU and CUDA kernel: the work is a matmul, and θ lives in the weight's pruned slots, so the
forward needs no gather or scatter.

Autocast does not reach custom ops, so the caller passes the autocast dtype as ``compute_dtype``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from resu.compile.registry import LIB, define_op


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
