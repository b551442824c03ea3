"""``ResuParameter``: a weight that knows its mask and mode, and trains only the slots it should.

A wrapper tensor subclass with the outer shape and dtype of the original weight. Its inner tensors are

- ``_weight``: the dense weight. In SPARSE mode its pruned slots are exactly zero; in RESU mode they
  hold the trainable resurrection values θ, so the forward is the plain dense ``x @ Wᵀ``.
- ``_mask_storage`` (not in DENSE mode): the adaptive mask encoding (:mod:`resu.tensors.mask`).

In QRESU mode there is no ``_weight``: the frozen active weights are stored quantized (``_qdata``
packed codes, ``_qscale``/``_qzero``, see :mod:`resu.tensors.quantized`) and θ is the flat vector
``_theta`` (n_pruned values, ascending pruned-slot order, the weight's dtype); the forward rebuilds the
effective weight with ``resu::dequant_merge``.

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
import resu.compile.qlinear  # noqa: F401  (registers torch.ops.resu.dequant_merge / qlinear)
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
from resu.tensors.quantized import QuantFormat, QuantizedState

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
        weight: Optional[torch.Tensor],
        mode: ResuMode = ResuMode.DENSE,
        mask_storage: Optional[torch.Tensor] = None,
        encoding: Optional[str] = None,
        n_pruned: int = 0,
        layout_id: Optional[int] = None,
        requires_grad: bool = False,
        quant: Optional[QuantizedState] = None,
        shape: Optional[torch.Size] = None,
    ):
        if weight is not None:
            shape, dtype, device = weight.shape, weight.dtype, weight.device
        else:  # QRESU: the outer dtype is θ's, the shape is given
            shape, dtype, device = shape, quant.theta.dtype, quant.qdata.device
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)

    def __init__(
        self,
        weight: Optional[torch.Tensor],
        mode: ResuMode = ResuMode.DENSE,
        mask_storage: Optional[torch.Tensor] = None,
        encoding: Optional[str] = None,
        n_pruned: int = 0,
        layout_id: Optional[int] = None,
        requires_grad: bool = False,
        quant: Optional[QuantizedState] = None,
        shape: Optional[torch.Size] = None,
    ):
        mode = ResuMode(mode)
        if mode.has_mask and (mask_storage is None or encoding is None):
            raise ValueError(f"a ResuParameter in {mode.value} mode needs mask_storage and encoding")
        if (mode is ResuMode.QRESU) != (quant is not None) or (weight is None) != (quant is not None):
            raise ValueError("a ResuParameter has a quantized state (and no weight) exactly in QRESU mode")
        self._weight = weight
        self._set_quant(quant)
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
        if self._mode is ResuMode.QRESU:
            names = ["_qdata", "_qscale", "_qzero", "_theta", "_mask_storage"]
        else:
            names = ["_weight", "_mask_storage"] if self._mode.has_mask else ["_weight"]
        encoding = self._encoding.value if self._encoding is not None else None
        return names, (self._mode.value, encoding, self._n_pruned, self._qformat)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        mode, encoding, n_pruned, fmt = meta
        quant = None
        if fmt is not None:
            quant = QuantizedState(inner["_qdata"], inner["_qscale"], inner["_qzero"], inner["_theta"], fmt)
        return ResuParameter(
            inner.get("_weight"), mode, inner.get("_mask_storage"), encoding, n_pruned, layout_id=0,
            quant=quant, shape=outer_size,
        )

    def _stable_hash_for_caching(self) -> str:
        enc = self._encoding.value if self._encoding is not None else "none"
        fmt = "" if self._qformat is None else f",{self._qformat}"
        return f"ResuParameter({self._mode.value},{enc},{self._n_pruned},{tuple(self.shape)},{self.dtype}{fmt})"

    def __reduce_ex__(self, protocol):
        quant = self._quant
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
                None if quant is None else (*quant[:4], quant.fmt.bits, quant.fmt.scheme, quant.fmt.group_size),
                tuple(self.shape),
            ),
        )

    def __repr__(self) -> str:
        extra = ""
        if self._mode.has_mask:
            extra = f", sparsity={self.sparsity:.3f}, mask={self._encoding.value}"
        if self._qformat is not None:
            extra += f", bits={self._qformat.bits}, scheme={self._qformat.scheme}"
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

    @property
    def theta(self) -> Optional[torch.Tensor]:
        """θ as a flat vector (n_pruned values, ascending pruned-slot order), None outside RESU/QRESU.

        In QRESU mode this is the stored θ itself; in RESU mode a copy gathered from the pruned slots.
        """
        if self._mode is ResuMode.QRESU:
            return self._theta.detach()
        if self._mode is ResuMode.RESU:
            return self._gather_pruned(self._weight.detach())
        return None

    @property
    def quant_format(self) -> Optional[QuantFormat]:
        """The :class:`~resu.tensors.quantized.QuantFormat` of the frozen active weights in QRESU mode, else None."""
        return self._qformat

    def effective_weight(self) -> torch.Tensor:
        """The dense weight the forward uses (active values, and θ in RESU/QRESU mode), as a detached plain tensor.

        Outside QRESU mode it shares storage with this parameter: treat it as read-only. In QRESU mode
        it is a new tensor: the dequantized active weights merged with θ.
        """
        if self._mode is ResuMode.QRESU:
            with torch.no_grad():
                return self._dequant_merge(self.dtype)
        return self._weight.detach()

    # ------------------------------------------------------------------ internal helpers
    @property
    def _quant(self) -> Optional[QuantizedState]:
        if self._qformat is None:
            return None
        return QuantizedState(self._qdata, self._qscale, self._qzero, self._theta, self._qformat)

    def _set_quant(self, quant: Optional[QuantizedState]) -> None:
        if quant is None:
            self._qdata = self._qscale = self._qzero = self._theta = self._qformat = None
        else:
            self._qdata, self._qscale, self._qzero, self._theta, self._qformat = quant

    def _quant_op_args(self) -> tuple:
        """The arguments of ``resu::dequant_merge``/``resu::qlinear`` after ``x`` and before ``bias``."""
        rows, cols = self.shape[0], self.numel() // max(self.shape[0], 1)
        fmt = self._qformat
        return (
            self._qdata, self._qscale, self._qzero, self._theta, self._mask_storage, self._encoding.value,
            self._n_pruned, rows, cols, fmt.bits, fmt.group_cols(cols), fmt.row_stride(cols),
        )

    def _dequant_merge(self, dtype: torch.dtype) -> torch.Tensor:
        """The QRESU effective weight (this shape) in ``dtype``."""
        return torch.ops.resu.dequant_merge(*self._quant_op_args(), dtype).view(self.shape)

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
        if mode.trains_theta:
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
    def _enter_qresu_(self, quant: QuantizedState) -> None:
        """SPARSE → QRESU: keep ``quant`` (codes of the active weights, θ) and free the dense weight."""
        self._set_quant(quant)
        self._weight = None
        self._set_layout(ResuMode.QRESU, self._mask_storage, self._encoding, self._n_pruned)

    @torch.no_grad()
    def _exit_qresu_(self, commit: bool) -> None:
        """QRESU → DENSE with the dequantized weights and θ merged (commit), or → SPARSE with θ zeroed."""
        weight = self._dequant_merge(self.dtype).contiguous()
        self._weight = weight
        self._set_quant(None)
        if commit:
            self._set_layout(ResuMode.DENSE)
        else:
            self._zero_pruned_(weight)
            self._set_layout(ResuMode.SPARSE, self._mask_storage, self._encoding, self._n_pruned)

    @torch.no_grad()
    def _exit_resu_(self, commit: bool) -> None:
        """RESU → DENSE keeping θ (commit) or RESU → SPARSE zeroing it."""
        self.__dict__.pop("_stock_optimizer", None)  # the opt-in lasts one RESU phase
        if commit:
            self._set_layout(ResuMode.DENSE)
        else:
            self._zero_pruned_(self._weight)
            self._set_layout(ResuMode.SPARSE, self._mask_storage, self._encoding, self._n_pruned)

    def _refuse_write_in_resu(self, what: str, restorable: bool = False) -> None:
        if restorable and self._restores_active_after_writes():
            return
        if self._mode.trains_theta:
            mode, exit_fn = ("QRESU", "exit_qresu_") if self._mode is ResuMode.QRESU else ("RESU", "exit_resu_")
            raise RuntimeError(
                f"{what} on a ResuParameter in {mode} mode would change its frozen active weights. "
                "To train θ use resu.ResuAdamW (stock torch.optim optimizers update every slot); to change "
                f"the weights, call resu.{exit_fn}(model) first."
            )

    def _restores_active_after_writes(self) -> bool:
        """True for a RESU weight opted in to stock optimizers (``_stock_optimizer``, set by
        :class:`resu.modules.linear.RESULinear`): in-place ops may write into it, and its active slots
        are restored bitwise afterwards (see :func:`_run_on_effective_weight`)."""
        return self._mode is ResuMode.RESU and bool(self.__dict__.get("_stock_optimizer"))

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
            self._set_quant(new._quant)
            self._set_layout(new._mode, new._mask_storage, enc, new._n_pruned)
            self._layout_id = new._layout_id
            return
        self._refuse_write_in_resu("assigning .data")
        if self._mode is ResuMode.SPARSE:
            self._weight = new.detach().clone().contiguous()
            self._zero_pruned_(self._weight)
        else:
            self._weight = new.detach().contiguous()

    def _map_inner(self, fn, mask_fn=None) -> "ResuParameter":
        """A new ResuParameter (same layout) with ``fn(t, is_value)`` applied to every inner tensor.

        ``is_value`` is True for the tensor that carries the outer dtype (the weight, or θ in QRESU);
        the mask storage takes ``mask_fn`` (default: unchanged).
        """
        enc = self._encoding.value if self._encoding is not None else None
        mask = self._mask_storage
        if mask is not None and mask_fn is not None:
            mask = mask_fn(mask)
        weight = None if self._weight is None else fn(self._weight, True)
        quant = None if self._qformat is None else self._quant.map(fn)
        return ResuParameter(weight, self._mode, mask, enc, self._n_pruned, self._layout_id, quant=quant, shape=self.shape)

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
    if param._mode.trains_theta and grad is not None and not isinstance(grad, CompactGrad):
        with torch.no_grad():
            values = torch.ops.resu.gather_masked(
                grad, param._mask_storage, param._encoding.value, param._n_pruned, True, param.dtype
            )
        param.grad = CompactGrad(values, param._mask_storage, param._encoding, param.shape)


def _rebuild_resu_parameter(
    weight, mode, mask_storage, encoding, n_pruned, layout_id, requires_grad, is_param=False, quant=None, shape=None
):
    if quant is not None:
        qdata, scale, zero, theta, bits, scheme, group_size = quant
        quant = QuantizedState(qdata, scale, zero, theta, QuantFormat(bits, scheme, group_size))
    p = ResuParameter(
        weight, mode, mask_storage, encoding, n_pruned, layout_id, requires_grad, quant=quant,
        shape=None if shape is None else torch.Size(shape),
    )
    if is_param:
        p._is_param = True  # what nn.Parameter(subclass) sets: keeps isinstance(p, nn.Parameter) after torch.load
    return p


def _linear_args(args, kwargs):
    x = args[0] if len(args) > 0 else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias


def _unwrap(t):
    if not isinstance(t, ResuParameter):
        return t
    return t._weight if t._weight is not None else t.effective_weight()


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
    active weights (this is what stops a stock optimizer from decaying them). A RESU weight opted in
    to stock optimizers (``_stock_optimizer``) takes the write instead, and gets its active values
    back bitwise right after it (gathered before the op, scattered back after).
    """
    mutated = _mutated_resu_params(func, args, kwargs)
    for p in mutated:
        p._refuse_write_in_resu(f"in-place {func}", restorable=True)
    frozen = [_save_active(p) for p in mutated if p._restores_active_after_writes()]
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    for p in mutated:
        if p._mode is ResuMode.SPARSE:
            p._zero_pruned_(p._weight)
    for flat, index, values in frozen:
        flat.index_copy_(0, index, values)
    if mutated and isinstance(out, torch.Tensor) and out is mutated[0]._weight:
        return mutated[0]
    return out


def _save_active(p: "ResuParameter") -> tuple:
    """``(flat weight, active flat indices, their current values)``: what restores the active slots."""
    flat = p._weight.view(-1)
    index = mask_ops.active_flat_indices(p._mask_storage, p._encoding, p.numel(), p._n_pruned)
    return flat, index, flat.index_select(0, index)


# ---------------------------------------------------------------------- op table: resu ops
# The handlers call the plain-tensor reference implementations directly rather than the ops: the
# op (what autograd records) is the unit at the ResuParameter level; below it, a compiled graph then
# holds ordinary aten matmuls that Inductor lowers and fuses itself, with no Python call at run time.
@implements(torch.ops.resu.linear.default)
def _linear(func, args, kwargs):
    x, weight, bias, dtype = args
    if weight._mode is ResuMode.QRESU:
        return torch.ops.resu.qlinear(_unwrap(x), *weight._quant_op_args(), bias, dtype)
    return linear_reference(_unwrap(x), weight._weight, bias, dtype)


@implements(torch.ops.resu.linear_input_grad.default)
def _linear_input_grad(func, args, kwargs):
    grad_out, weight, dtype = args
    if weight._mode is ResuMode.QRESU:
        # Recomputed here, never saved from the forward: the effective weight costs one pass over packed codes.
        return linear_input_grad_reference(grad_out, weight._dequant_merge(dtype or grad_out.dtype), None)
    return linear_input_grad_reference(grad_out, weight._weight, dtype)


@implements(torch.ops.resu.linear_weight_grad.default)
def _linear_weight_grad(func, args, kwargs):
    grad_out, x, weight = args
    if weight._mode.trains_theta:
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
    return args[0]._map_inner(lambda t, _: func(t))


@implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._map_inner(lambda t, _: t.clone(), lambda m: m.clone())


@implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """dtype/device moves keep the subclass (``model.to(...)``, ``.cuda()``, ``.bfloat16()``).

    The dtype applies to the weight (θ in QRESU mode); codes, scales and the mask only move device.
    """
    device = kwargs.get("device")
    move = (lambda t: t.to(device=device)) if device is not None else None
    return args[0]._map_inner(lambda t, is_value: func(t, **kwargs) if is_value else (move(t) if move else t), move)


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
        _adopt_copy(dst, src)
        return dst
    if dst._mode.trains_theta:
        raise RuntimeError(
            f"copying a plain tensor into a ResuParameter in {dst._mode.name} mode (load_state_dict of a dense "
            "checkpoint?) would overwrite its frozen active weights and θ. Load it before resu.enter_resu_ / "
            "resu.enter_qresu_, or load a state_dict saved from a model with ResuParameters (it carries mode and mask)."
        )
    return _run_on_effective_weight(func, args, kwargs)


def _adopt_copy(dst: "ResuParameter", src: "ResuParameter") -> None:
    """Make ``dst`` a copy of ``src`` (values, mode, mask, quantized state) on ``dst``'s device and dtype."""
    device = dst.device
    if src._weight is not None and dst._weight is not None and src._weight.shape == dst._weight.shape:
        dst._weight.copy_(src._weight)  # in place: keeps the storage the parameter already had
    elif src._weight is not None:
        dst._weight = src._weight.to(device=device, dtype=dst.dtype, copy=True)
    else:
        dst._weight = None
    quant = src._quant
    if quant is not None:
        quant = quant.map(lambda t, is_value: t.to(device=device, dtype=dst.dtype if is_value else t.dtype, copy=True))
    dst._set_quant(quant)
    mask = src._mask_storage
    if mask is not None:
        mask = mask.to(device=device, copy=True)
    enc = src._encoding.value if src._encoding is not None else None
    if (src._mode, src._layout_id) != (dst._mode, dst._layout_id):
        dst.grad = None
    dst._set_layout(src._mode, mask, enc, src._n_pruned)
    dst._layout_id = src._layout_id


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
