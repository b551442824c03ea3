"""``ResuParameter``: a weight that knows its mask and mode, and trains only the slots it should.

A wrapper tensor subclass with the outer shape and dtype of the original weight. Its inner tensors are

- ``_weight``: the dense weight. In SPARSE mode its pruned slots are exactly zero; in RESU mode they
  hold the trainable resurrection values θ, so the forward is the plain dense ``x @ Wᵀ``.
- ``_mask_storage`` (not in DENSE mode): the adaptive mask encoding (:mod:`resu.tensors.mask`).

``F.linear`` with a ResuParameter weight is caught in ``__torch_function__`` (``aten.linear`` is
decomposed before ``__torch_dispatch__`` would see it) and routed to ``torch.ops.resu.linear``, whose
backward returns a :class:`~resu.tensors.compact_grad.CompactGrad` in RESU mode. Every other op goes
through the dispatch table below; ops without a handler run on the effective dense weight.

Modules are never swapped: ``sparsify_`` only replaces ``module.weight`` with a ResuParameter wrapped
as an ``nn.Parameter``.
"""

from __future__ import annotations

import secrets
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

import resu.compile.linear  # noqa: F401  (registers torch.ops.resu.linear*)
import resu.compile.masked_ops  # noqa: F401  (registers torch.ops.resu.gather_masked)
from resu.compile.linear import (
    LinearFunction,
    autocast_dtype,
    linear_input_grad_reference,
    linear_reference,
    linear_weight_grad_reference,
    rows,
)
from resu.tensors import mask as mask_ops
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.mode import ResuMode
from resu.tensors.op_table import OpTable

aten = torch.ops.aten
_OPS = OpTable("ResuParameter")
implements = _OPS.implements
_LINEAR_FUNCS = (F.linear, torch._C._nn.linear)
_SETITEM = torch._C.TensorBase.__setitem__
_DATA_SET = torch.Tensor.data.__set__  # a method-wrapper: compare with ==, not `is`


def _new_layout_id() -> int:
    return secrets.randbits(62)


class ResuParameter(torch.Tensor):
    """A weight with a mode (DENSE, SPARSE, RESU) and, outside DENSE, an adaptive mask.

    Build one with :meth:`from_weight` (or :func:`resu.sparsify_`); change its mode with
    :func:`resu.prune_`, :func:`resu.enter_resu_` and :func:`resu.exit_resu_`.
    """

    _weight: torch.Tensor
    _mask_storage: Optional[torch.Tensor]

    @staticmethod
    def __new__(
        cls,
        weight: torch.Tensor,
        mode: ResuMode = ResuMode.DENSE,
        mask_storage: Optional[torch.Tensor] = None,
        encoding: Optional[str] = None,
        n_pruned: int = 0,
        layout_id: Optional[int] = None,
        requires_grad: bool = False,
    ):
        return torch.Tensor._make_wrapper_subclass(
            cls, weight.shape, dtype=weight.dtype, device=weight.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        weight: torch.Tensor,
        mode: ResuMode = ResuMode.DENSE,
        mask_storage: Optional[torch.Tensor] = None,
        encoding: Optional[str] = None,
        n_pruned: int = 0,
        layout_id: Optional[int] = None,
        requires_grad: bool = False,
    ):
        mode = ResuMode(mode)
        if mode.has_mask and (mask_storage is None or encoding is None):
            raise ValueError(f"a ResuParameter in {mode.value} mode needs mask_storage and encoding")
        self._weight = weight
        self._mode = mode
        self._mask_storage = mask_storage if mode.has_mask else None
        self._encoding = mask_ops.MaskEncoding(encoding) if mode.has_mask else None
        self._n_pruned = int(n_pruned) if mode.has_mask else 0
        self._layout_id = _new_layout_id() if layout_id is None else int(layout_id)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, requires_grad: Optional[bool] = None) -> "ResuParameter":
        """A DENSE ResuParameter holding ``weight`` (the storage is reused, not copied)."""
        if not torch.is_floating_point(weight):
            raise ValueError(f"ResuParameter needs a floating-point weight, got dtype {weight.dtype}")
        rg = weight.requires_grad if requires_grad is None else requires_grad
        return cls(weight.detach().contiguous(), requires_grad=rg)

    # ------------------------------------------------------------------ flatten protocol
    def __tensor_flatten__(self):
        names = ["_weight", "_mask_storage"] if self._mode.has_mask else ["_weight"]
        encoding = self._encoding.value if self._encoding is not None else None
        return names, (self._mode.value, encoding, self._n_pruned)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        mode, encoding, n_pruned = meta
        return ResuParameter(inner["_weight"], mode, inner.get("_mask_storage"), encoding, n_pruned, layout_id=0)

    def _stable_hash_for_caching(self) -> str:
        enc = self._encoding.value if self._encoding is not None else "none"
        return f"ResuParameter({self._mode.value},{enc},{self._n_pruned},{tuple(self.shape)},{self.dtype})"

    def __reduce_ex__(self, protocol):
        return (
            _rebuild_resu_parameter,
            (
                self._weight,
                self._mode.value,
                self._mask_storage,
                self._encoding.value if self._encoding is not None else None,
                self._n_pruned,
                self._layout_id,
                self.requires_grad,
                getattr(self, "_is_param", False),
            ),
        )

    def __repr__(self) -> str:
        extra = ""
        if self._mode.has_mask:
            extra = f", sparsity={self.sparsity:.3f}, mask={self._encoding.value}"
        return f"ResuParameter(shape={tuple(self.shape)}, dtype={self.dtype}, mode={self._mode.value}{extra})"

    # ------------------------------------------------------------------ public accessors
    @property
    def mode(self) -> ResuMode:
        """The current :class:`ResuMode`."""
        return self._mode

    @property
    def mask(self) -> Optional[mask_ops.SparseMask]:
        """The :class:`~resu.tensors.mask.SparseMask` of this weight, None in DENSE mode.

        It shares this parameter's mask storage; treat it as read-only (``update`` on it does not
        change the parameter): change masks with :func:`resu.prune_`.
        """
        if not self._mode.has_mask:
            return None
        return mask_ops.SparseMask.from_storage(self._mask_storage, self._encoding, tuple(self.shape), self._n_pruned)

    @property
    def n_pruned(self) -> int:
        """Number of pruned slots (0 in DENSE mode)."""
        return self._n_pruned

    @property
    def sparsity(self) -> float:
        """Fraction of pruned slots."""
        n = self.numel()
        return self._n_pruned / n if n else 0.0

    @property
    def active_mask(self) -> torch.Tensor:
        """Dense boolean tensor, True at active slots (computed on demand; never stored)."""
        if not self._mode.has_mask:
            return torch.ones(self.shape, dtype=torch.bool, device=self.device)
        return ~self._pruned_bool().view(self.shape)

    @property
    def mask_nbytes(self) -> int:
        """Bytes held by the mask encoding (0 in DENSE mode)."""
        return 0 if self._mask_storage is None else self._mask_storage.numel() * self._mask_storage.element_size()

    def effective_weight(self) -> torch.Tensor:
        """The dense weight the forward uses (active values, and θ in RESU mode), as a detached plain tensor.

        It shares storage with this parameter: treat it as read-only.
        """
        return self._weight.detach()

    # ------------------------------------------------------------------ internal helpers
    def _pruned_bool(self) -> torch.Tensor:
        return mask_ops.pruned_bool(self._mask_storage, self._encoding, self.numel(), self._n_pruned)

    def _pruned_indices(self) -> torch.Tensor:
        return mask_ops.pruned_flat_indices(self._mask_storage, self._encoding, self.numel(), self._n_pruned)

    def _gather_pruned(self, dense: torch.Tensor) -> torch.Tensor:
        return mask_ops.gather_pruned(dense.reshape(-1), self._mask_storage, self._encoding, self.numel(), self._n_pruned)

    def _gather_active(self, dense: torch.Tensor) -> torch.Tensor:
        return mask_ops.gather_active(dense.reshape(-1), self._mask_storage, self._encoding, self.numel(), self._n_pruned)

    def _zero_pruned_(self, dense: torch.Tensor) -> torch.Tensor:
        """Zero the pruned slots of ``dense`` (same shape as this parameter) in place."""
        flat = dense.view(-1)
        flat.copy_(mask_ops.zero_pruned(flat, self._mask_storage, self._encoding, self.numel(), self._n_pruned))
        return dense

    def _write_pruned_(self, values: torch.Tensor) -> None:
        """Write ``values`` (ascending flat order) into the pruned slots of the weight, in place."""
        self._weight.view(-1).index_copy_(0, self._pruned_indices(), values.to(self._weight.dtype))

    def _set_layout(self, mode: ResuMode, mask_storage=None, encoding=None, n_pruned: int = 0) -> None:
        self._mode = mode
        self._mask_storage = mask_storage if mode.has_mask else None
        self._encoding = mask_ops.MaskEncoding(encoding) if mode.has_mask else None
        self._n_pruned = int(n_pruned) if mode.has_mask else 0
        self._layout_id = _new_layout_id()
        if mode is ResuMode.RESU:
            self._ensure_foreign_grad_hook()

    def _ensure_foreign_grad_hook(self) -> None:
        """Register :func:`compact_foreign_grad` once on this (leaf, trainable) parameter.

        Done on entering RESU mode. A hook lives on the Python object, so a later ``model.to(...)``
        or ``.cuda()`` (which swaps in a new parameter) drops it; foreign dense gradients then stay
        dense, which ResuAdamW still handles correctly (it uses their θ part only).
        """
        if self.requires_grad and self.grad_fn is None and not self.__dict__.get("_foreign_grad_hook"):
            self.register_post_accumulate_grad_hook(compact_foreign_grad)
            self._foreign_grad_hook = True

    @torch.no_grad()
    def _apply_pruning_(self, pruned: torch.Tensor) -> None:
        """Enter SPARSE mode with ``pruned`` (bool, this shape, True = pruned): pruned slots become 0."""
        storage, encoding = mask_ops.encode_pruned(pruned.reshape(self.shape).to(self.device))
        self._set_layout(ResuMode.SPARSE, storage, encoding, int(pruned.sum()))
        self._zero_pruned_(self._weight)

    @torch.no_grad()
    def _enter_resu_(self, theta: torch.Tensor) -> None:
        """SPARSE → RESU, writing θ (n_pruned values) into the pruned slots."""
        self._write_pruned_(theta)
        self._set_layout(ResuMode.RESU, self._mask_storage, self._encoding, self._n_pruned)

    @torch.no_grad()
    def _exit_resu_(self, commit: bool) -> None:
        """RESU → DENSE keeping θ (commit) or RESU → SPARSE zeroing it."""
        if commit:
            self._set_layout(ResuMode.DENSE)
        else:
            self._zero_pruned_(self._weight)
            self._set_layout(ResuMode.SPARSE, self._mask_storage, self._encoding, self._n_pruned)

    def _refuse_write_in_resu(self, what: str) -> None:
        if self._mode is ResuMode.RESU:
            raise RuntimeError(
                f"{what} on a ResuParameter in RESU mode would change its frozen active weights. "
                "To train θ use resu.ResuAdamW (stock torch.optim optimizers update every slot); to change "
                "the weights, call resu.exit_resu_(model) first."
            )

    def _setitem(self, index, value) -> None:
        """``p[index] = value``: writes the weight; SPARSE keeps pruned slots at zero; refused in RESU."""
        self._refuse_write_in_resu("item assignment")
        if torch.is_grad_enabled() and self.requires_grad:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
        self._weight[index] = _unwrap(value)
        if self._mode is ResuMode.SPARSE:
            self._zero_pruned_(self._weight)

    def _set_data(self, new: torch.Tensor) -> None:
        """``p.data = new``: same shape, dtype and device only (the wrapper's metadata is fixed).

        From a ResuParameter, takes its weight, mode and mask. From a plain tensor: DENSE shares its
        storage (as ``.data =`` does); SPARSE copies it and keeps pruned slots at zero; RESU refuses.
        """
        if (new.shape, new.dtype, new.device) != (self.shape, self.dtype, self.device):
            raise RuntimeError(
                f"cannot assign .data of shape {tuple(new.shape)}, {new.dtype}, {new.device} to a ResuParameter of "
                f"shape {tuple(self.shape)}, {self.dtype}, {self.device}; use resu.densify_ to get plain parameters"
            )
        if isinstance(new, ResuParameter):
            enc = new._encoding.value if new._encoding is not None else None
            self._weight = new._weight
            self._set_layout(new._mode, new._mask_storage, enc, new._n_pruned)
            self._layout_id = new._layout_id
            return
        self._refuse_write_in_resu("assigning .data")
        if self._mode is ResuMode.SPARSE:
            self._weight = new.detach().clone().contiguous()
            self._zero_pruned_(self._weight)
        else:
            self._weight = new.detach().contiguous()

    def _same_inner(self, weight: torch.Tensor, mask_storage: Optional[torch.Tensor]) -> "ResuParameter":
        enc = self._encoding.value if self._encoding is not None else None
        return ResuParameter(weight, self._mode, mask_storage, enc, self._n_pruned, self._layout_id)

    # ------------------------------------------------------------------ interception
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS:
            x, weight, bias = _linear_args(args, kwargs)
            if isinstance(weight, ResuParameter) and not isinstance(x, ResuParameter):
                with torch._C.DisableTorchFunctionSubclass():
                    dtype = autocast_dtype(x.device.type) if x.dtype != torch.float64 else None
                    if dtype is not None:
                        x = x.to(dtype)
                        bias = bias.to(dtype) if bias is not None else None
                    return LinearFunction.apply(x, weight, bias, dtype)
        if func is _SETITEM and isinstance(args[0], ResuParameter):
            return args[0]._setitem(args[1], args[2])
        if func == _DATA_SET and isinstance(args[0], ResuParameter):
            return args[0]._set_data(args[1])
        # Everything else runs as usual; results are not re-wrapped (unlike the default
        # __torch_function__, which would turn every output into this subclass).
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.lookup(func)
        if handler is not None:
            return handler(func, args, kwargs)
        return _run_on_effective_weight(func, args, kwargs)


def compact_foreign_grad(param: "ResuParameter") -> None:
    """Post-accumulate-grad hook: in RESU mode, keep only the θ part of a dense gradient.

    Gradients normally arrive compact through ``resu::linear``. A weight used by some other op as
    well (``x @ W.t()``, or a composite functional such as ``F.multi_head_attention_forward`` that
    calls ``linear`` internally) receives a dense gradient from aten's formulas; its active-slot part
    belongs to frozen weights, so it is dropped here and the gradient becomes a CompactGrad.
    """
    grad = param.grad
    if param._mode is ResuMode.RESU and grad is not None and not isinstance(grad, CompactGrad):
        with torch.no_grad():
            values = torch.ops.resu.gather_masked(
                grad, param._mask_storage, param._encoding.value, param._n_pruned, True, param.dtype
            )
        param.grad = CompactGrad(values, param._mask_storage, param._encoding, param.shape)


def _rebuild_resu_parameter(weight, mode, mask_storage, encoding, n_pruned, layout_id, requires_grad, is_param=False):
    p = ResuParameter(weight, mode, mask_storage, encoding, n_pruned, layout_id, requires_grad)
    if is_param:
        p._is_param = True  # what nn.Parameter(subclass) sets: keeps isinstance(p, nn.Parameter) after torch.load
    return p


def _linear_args(args, kwargs):
    x = args[0] if len(args) > 0 else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias


def _unwrap(t):
    return t._weight if isinstance(t, ResuParameter) else t


def _mutated_resu_params(func, args, kwargs) -> list:
    """The ResuParameters an op writes into, read off its schema's alias annotations."""
    if not func._schema.is_mutable:
        return []
    mutated = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, ResuParameter):
                mutated.append(leaf)
    return mutated


def _run_on_effective_weight(func, args, kwargs):
    """Fallback for ops without a handler: run them on the effective dense weight.

    In-place ops write through to the weight. In SPARSE mode the pruned slots are re-zeroed after,
    so the SPARSE invariant holds; in RESU mode they are refused, since they would move frozen
    active weights (this is what stops a stock optimizer from decaying them).
    """
    mutated = _mutated_resu_params(func, args, kwargs)
    for p in mutated:
        p._refuse_write_in_resu(f"in-place {func}")
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    for p in mutated:
        if p._mode is ResuMode.SPARSE:
            p._zero_pruned_(p._weight)
    if mutated and isinstance(out, torch.Tensor) and out is mutated[0]._weight:
        return mutated[0]
    return out


# ---------------------------------------------------------------------- op table: resu ops
# The handlers call the plain-tensor reference implementations directly rather than the ops: the
# op (what autograd records) is the unit at the ResuParameter level; below it, a compiled graph then
# holds ordinary aten matmuls that Inductor lowers and fuses itself, with no Python call at run time.
@implements(torch.ops.resu.linear.default)
def _linear(func, args, kwargs):
    x, weight, bias, dtype = args
    return linear_reference(_unwrap(x), weight._weight, bias, dtype)


@implements(torch.ops.resu.linear_input_grad.default)
def _linear_input_grad(func, args, kwargs):
    grad_out, weight, dtype = args
    return linear_input_grad_reference(grad_out, weight._weight, dtype)


@implements(torch.ops.resu.linear_weight_grad.default)
def _linear_weight_grad(func, args, kwargs):
    grad_out, x, weight = args
    if weight._mode is ResuMode.RESU:
        # Gather θ's gradient straight from the matmul result (bf16 under autocast): the dense
        # weight-dtype gradient is never materialized.
        dense = rows(grad_out).t() @ rows(x)
        values = torch.ops.resu.gather_masked(
            dense, weight._mask_storage, weight._encoding.value, weight._n_pruned, True, weight.dtype
        )
        return CompactGrad(values, weight._mask_storage, weight._encoding, weight.shape)
    dense = linear_weight_grad_reference(grad_out, x, weight._weight)
    if weight._mode is ResuMode.SPARSE:
        return weight._zero_pruned_(dense)
    return dense


# ---------------------------------------------------------------------- op table: aten ops
@implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    p = args[0]
    return p._same_inner(func(p._weight), p._mask_storage)


@implements(aten.clone.default)
def _clone(func, args, kwargs):
    p = args[0]
    mask = p._mask_storage.clone() if p._mask_storage is not None else None
    return p._same_inner(p._weight.clone(), mask)


@implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """dtype/device moves keep the subclass (``model.to(...)``, ``.cuda()``, ``.bfloat16()``)."""
    p = args[0]
    weight = func(p._weight, **kwargs)
    device = kwargs.get("device")
    mask = p._mask_storage
    if mask is not None and device is not None:
        mask = mask.to(device=device)
    return p._same_inner(weight, mask)


@implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    """``dst.copy_(src)``; what ``load_state_dict`` calls.

    From a ResuParameter the destination also takes the source's mode and mask, so loading a
    checkpoint into a freshly sparsified model restores it exactly. From a plain tensor only the
    values change (SPARSE mode keeps its pruned slots at zero).
    """
    dst, src = args[0], args[1]
    if not isinstance(dst, ResuParameter):
        return func(dst, _unwrap(src), **kwargs)
    if isinstance(src, ResuParameter):
        dst._weight.copy_(src._weight)
        mask = src._mask_storage
        if mask is not None:
            mask = mask.to(device=dst.device, copy=True)
        enc = src._encoding.value if src._encoding is not None else None
        if (src._mode, src._layout_id) != (dst._mode, dst._layout_id):
            dst.grad = None
        dst._set_layout(src._mode, mask, enc, src._n_pruned)
        dst._layout_id = src._layout_id
        return dst
    if dst._mode is ResuMode.RESU:
        raise RuntimeError(
            "copying a plain tensor into a ResuParameter in RESU mode (load_state_dict of a dense checkpoint?) "
            "would overwrite its frozen active weights and θ. Load it before resu.enter_resu_, or load a "
            "state_dict saved from a model with ResuParameters (it carries mode and mask)."
        )
    return _run_on_effective_weight(func, args, kwargs)


@implements(
    [
        aten.t.default,
        aten.transpose.int,
        aten.mm.default,
        aten.addmm.default,
        aten.matmul.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.expand.default,
        aten.permute.default,
    ]
)
def _read_effective(func, args, kwargs):
    """Read-only ops (``x @ W.t()`` and friends) run directly on the effective dense weight."""
    return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))


torch.serialization.add_safe_globals([ResuParameter, _rebuild_resu_parameter])
