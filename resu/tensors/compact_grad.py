"""``CompactGrad``: the gradient of a RESU-mode weight, storing only the θ (pruned-slot) values.

Its outer shape and dtype are those of the weight, so autograd's ``AccumulateGrad`` stores it as
``param.grad`` like any gradient; inside it holds ``values`` (one entry per pruned slot, in ascending
flat-index order) and the weight's mask storage. Active slots have no gradient by construction, so
gradient isolation (⟨G_A, G_P⟩ = 0) holds without any masking, and gradient memory is 4·s bytes per
fp32 weight instead of 4.

The op table covers what training meets: gradient accumulation (``add``/``add_``), clipping
(``linalg_vector_norm``, ``mul_``), ``zero_grad`` and AMP unscaling. Any other out-of-place op sees
the materialized dense gradient (correct, slower), and so does arithmetic with a scalar or a dense
tensor (``g + 1`` is dense). In place, a compact gradient only takes values at its θ slots: adding a
dense tensor into it (``g += dense``, what gradient accumulation does) keeps that tensor's θ part,
since active slots of a RESU weight have no gradient; any other in-place op raises.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils._pytree import tree_map

from resu.tensors import mask as mask_ops
from resu.tensors.op_table import OpTable

aten = torch.ops.aten
_OPS = OpTable()
implements = _OPS.implements


class CompactGrad(torch.Tensor):
    """Gradient of a RESU weight holding only its pruned-slot values.

    Args:
        values: 1-D tensor of ``n_pruned`` gradient values, ascending flat-index order.
        mask_storage: the weight's mask storage tensor (see :mod:`resu.tensors.mask`).
        encoding: the mask encoding of ``mask_storage``.
        shape: outer (weight) shape.
    """

    values: torch.Tensor
    mask_storage: torch.Tensor

    @staticmethod
    def __new__(cls, values, mask_storage, encoding, shape):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=values.dtype, device=values.device, requires_grad=False
        )

    def __init__(self, values, mask_storage, encoding, shape):
        self.values = values
        self.mask_storage = mask_storage
        self.encoding = mask_ops.MaskEncoding(encoding)

    # ---- flatten protocol (torch.compile / AOTAutograd see the inner tensors) ----
    def __tensor_flatten__(self):
        return ["values", "mask_storage"], (self.encoding.value, tuple(self.shape))

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        encoding, shape = meta
        return CompactGrad(inner["values"], inner["mask_storage"], encoding, shape)

    def _stable_hash_for_caching(self) -> str:
        return f"CompactGrad({self.encoding.value},{tuple(self.shape)},{self.dtype},{self.values.shape[0]})"

    def __repr__(self) -> str:
        return (
            f"CompactGrad(shape={tuple(self.shape)}, dtype={self.dtype}, n_values={self.values.numel()}, "
            f"encoding={self.encoding.value})"
        )

    # ---- helpers ----
    @property
    def n_pruned(self) -> int:
        return self.values.shape[0]

    def _with_values(self, values: torch.Tensor) -> "CompactGrad":
        return CompactGrad(values, self.mask_storage, self.encoding, self.shape)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a dense tensor of this gradient's shape at its pruned slots."""
        return mask_ops.gather_pruned(
            dense.reshape(-1), self.mask_storage, self.encoding, self.numel(), self.n_pruned
        )

    def to_dense(self) -> torch.Tensor:
        """The full gradient: zeros at active slots, ``values`` at pruned slots."""
        flat = torch.zeros(self.numel(), dtype=self.values.dtype, device=self.values.device)
        flat = mask_ops.scatter_pruned(flat, self.values, self.mask_storage, self.encoding, self.numel(), self.n_pruned)
        return flat.view(self.shape)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _OPS.lookup(func)(func, args, kwargs or {})


@_OPS.fallback
def _dense_fallback(func, args, kwargs):
    """Ops without a handler see the materialized dense gradient; in-place ones are refused."""
    if func._schema.is_mutable:
        raise RuntimeError(
            f"{func} would write into a CompactGrad (the gradient of a RESU-mode ResuParameter, which "
            "stores only θ values). Update RESU weights with resu.ResuAdamW, or call "
            "grad.to_dense() first to get an ordinary tensor."
        )
    return func(*tree_map(_densify, args), **tree_map(_densify, kwargs))


def _densify(x):
    return x.to_dense() if isinstance(x, CompactGrad) else x


def _same_layout(a: CompactGrad, b: CompactGrad) -> bool:
    return a.shape == b.shape and a.encoding == b.encoding and a.n_pruned == b.n_pruned


def _values_of(other, like: CompactGrad):
    """``other`` expressed on ``like``'s pruned slots (scalars pass through)."""
    if isinstance(other, CompactGrad):
        if not _same_layout(other, like):
            raise RuntimeError(
                "cannot combine CompactGrads of different masks; clear .grad (optimizer.zero_grad()) "
                "after changing a weight's mask or mode"
            )
        return other.values
    if isinstance(other, torch.Tensor) and other.dim() > 0:
        return like.gather(other.expand(like.shape))
    return other


@implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    g = args[0]
    return g._with_values(func(g.values))


@implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._with_values(args[0].values.clone())


@implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    g = args[0]
    dtype = kwargs.get("dtype") or g.dtype
    device = kwargs.get("device") or g.device
    return CompactGrad(
        g.values.to(dtype=dtype, device=device), g.mask_storage.to(device=device), g.encoding, g.shape
    )


@implements([aten.zeros_like.default])
def _zeros_like(func, args, kwargs):
    g = args[0]
    dtype = kwargs.get("dtype") or g.dtype
    return g._with_values(torch.zeros_like(g.values, dtype=dtype))


@implements([aten.add.Tensor, aten.sub.Tensor])
def _add(func, args, kwargs):
    a, b = args[0], args[1]
    if isinstance(a, CompactGrad) and isinstance(b, CompactGrad):
        return a._with_values(func(a.values, _values_of(b, a), **kwargs))
    # With a scalar or a dense tensor the result has values at active slots too: it is dense.
    return func(*tree_map(_densify, args), **kwargs)


@implements([aten.add_.Tensor, aten.sub_.Tensor])
def _add_(func, args, kwargs):
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    if not isinstance(b, CompactGrad) and not isinstance(a, CompactGrad):
        return func(a, b, **kwargs)
    if not isinstance(a, CompactGrad):
        # dense.add_(compact): only the pruned slots of the dense tensor change.
        sign = -1 if func is aten.sub_.Tensor else 1
        flat = a.view(-1)
        idx = mask_ops.pruned_flat_indices(b.mask_storage, b.encoding, b.numel(), b.n_pruned)
        flat.index_add_(0, idx, b.values.to(a.dtype), alpha=sign * alpha)
        return a
    # Accumulating a dense gradient (from an op outside resu's linear path) into a compact one
    # keeps its θ part only: active slots of a RESU weight are frozen and have no gradient.
    func(a.values, _values_of(b, a), alpha=alpha)
    return a


@implements([aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar])
def _scale(func, args, kwargs):
    a, b = args[0], args[1]
    if not isinstance(a, CompactGrad) or (isinstance(b, torch.Tensor) and b.dim() > 0):
        return func(*tree_map(_densify, args), **kwargs)
    return a._with_values(func(a.values, b, **kwargs))


@implements([aten.mul_.Tensor, aten.div_.Tensor, aten.mul_.Scalar, aten.div_.Scalar])
def _scale_(func, args, kwargs):
    a, b = args[0], args[1]
    if not isinstance(a, CompactGrad):  # dense.mul_(compact)
        return func(a, _densify(b), **kwargs)
    if isinstance(b, torch.Tensor) and b.dim() > 0 and not isinstance(b, CompactGrad):
        raise RuntimeError(f"{func}: a CompactGrad can only be scaled in place by a scalar or 0-dim tensor")
    func(a.values, _values_of(b, a) if isinstance(b, CompactGrad) else b, **kwargs)
    return a


@implements(aten.neg.default)
def _neg(func, args, kwargs):
    return args[0]._with_values(-args[0].values)


@implements(aten.zero_.default)
def _zero_(func, args, kwargs):
    args[0].values.zero_()
    return args[0]


@implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, CompactGrad):  # dense.copy_(compact)
        return func(dst, _densify(src), **kwargs)
    dst.values.copy_(_values_of(src, dst))
    return dst


@implements(aten.linalg_vector_norm.default)
def _vector_norm(func, args, kwargs):
    g = args[0]
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype")
    # Absent (active) slots are zeros, which leave every norm of order >= 0 unchanged.
    if dim is None and isinstance(ord_, numbers.Real) and ord_ >= 0:
        if g.n_pruned == 0:
            out = torch.zeros((), dtype=dtype or g.dtype, device=g.device)
        else:
            out = torch.linalg.vector_norm(g.values, ord_, dtype=dtype)
        return out.reshape([1] * g.dim()) if keepdim else out
    return func(*tree_map(_densify, args), **kwargs)


@implements(aten._foreach_norm.Scalar)
def _foreach_norm(func, args, kwargs):
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    return [torch.linalg.vector_norm(t, ord_, dtype=dtype) for t in args[0]]


def _foreach_elementwise(op):
    def handler(func, args, kwargs):
        tensors, rest = args[0], args[1:]
        results = []
        for i, t in enumerate(tensors):
            per_elem = tuple(r[i] if isinstance(r, (list, tuple)) else r for r in rest)
            results.append(op(t, *per_elem, **kwargs))
        return None if func._schema.is_mutable else results

    return handler


for _name in ("mul_", "div_", "add_", "mul", "div", "add"):
    for _overload in ("Scalar", "Tensor", "List", "ScalarList"):
        _op = getattr(getattr(aten, f"_foreach_{_name}"), _overload, None)
        if _op is not None:
            implements(_op)(_foreach_elementwise(getattr(torch.Tensor, _name)))
implements(aten._foreach_zero_.default)(_foreach_elementwise(torch.Tensor.zero_))


@implements(aten._amp_foreach_non_finite_check_and_unscale_.default)
def _amp_unscale(func, args, kwargs):
    grads, found_inf, inv_scale = args
    inner = [g.values if isinstance(g, CompactGrad) else g for g in grads]
    func(inner, found_inf, inv_scale)
    return None
