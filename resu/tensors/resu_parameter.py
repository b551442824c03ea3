"""``ResuParameter``: a weight that knows its mask and mode, and trains only the slots it should.

A wrapper tensor subclass with the outer shape and dtype of the original weight: a few inner tensors
plus one frozen :class:`~resu.tensors.layout.ResuLayout` holding all of its metadata. Which inner
tensors exist is declared once per mode (:data:`resu.tensors.layout.INNER_TENSORS`); flatten,
unflatten, pickling, repr and ``_map_inner`` all read that declaration.

- ``_weight``: the dense weight. In SPARSE mode its pruned slots are exactly zero; in RESU mode they
  hold the trainable resurrection values θ, so the forward is the plain dense ``x @ Wᵀ``.
- ``_mask_storage`` (not in DENSE mode): the adaptive mask encoding (:mod:`resu.tensors.mask_kernels`).
- QRESU mode has no ``_weight``: the frozen active weights are stored quantized (``_qdata`` packed
  codes, ``_qscale``/``_qzero``, see :mod:`resu.tensors.quantized`) and θ is the flat vector ``_theta``
  (n_pruned values, ascending pruned-slot order, the weight's dtype).

Two tables route the ops that reach it: :data:`TORCH_FUNCTIONS` (``__torch_function__``: ``F.linear``,
``p[i] = v``, ``p.data = t``) and :data:`ATEN_OPS` (``__torch_dispatch__``). ``F.linear`` and the
``resu::linear*`` ops are registered in :mod:`resu.compile.linear`, beside the op definitions; the
generic aten handlers are in :mod:`resu.tensors.resu_ops`.

Modules are never swapped: ``sparsify_`` only replaces ``module.weight`` with a ResuParameter wrapped
as an ``nn.Parameter``.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from resu.tensors import mask_kernels as mask_ops
from resu.tensors.foreign_grad import compact_foreign_grad
from resu.tensors.layout import ALL_INNER_NAMES, ResuLayout, WritePolicy
from resu.tensors.mask import SparseMask
from resu.tensors.mode import ResuMode
from resu.tensors.op_table import OpTable
from resu.tensors.quantized import QuantFormat, QuantizedState
from resu.tensors.validate import CheckpointError, validate_resu_layout

#: ``__torch_function__`` handlers, keyed by the Python-level function.
TORCH_FUNCTIONS = OpTable()
#: ``__torch_dispatch__`` handlers, keyed by aten (or ``resu::``) overload.
ATEN_OPS = OpTable()


class ResuParameter(torch.Tensor):
    """A weight with a mode (DENSE, SPARSE, RESU, QRESU) and, outside DENSE, an adaptive mask.

    Build one with :meth:`from_weight` (or :func:`resu.sparsify_`); change its mode with
    :func:`resu.prune_`, :func:`resu.enter_resu_` and :func:`resu.exit_resu_`.

    Args:
        layout: the :class:`~resu.tensors.layout.ResuLayout` (mode, mask encoding, ...).
        inner: the inner tensors ``layout.inner_names`` names, by name.
        shape: the outer shape (default: the shape of ``inner["_weight"]``; required in QRESU mode).
        requires_grad: as for any tensor.
    """

    _layout: ResuLayout
    _weight: Optional[torch.Tensor]
    _mask_storage: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, layout: ResuLayout, inner: dict, shape=None, requires_grad: bool = False):
        names = layout.inner_names
        if set(inner) != set(names) or any(inner[n] is None for n in names):
            raise ValueError(f"a ResuParameter in {layout.mode.value} mode holds exactly {names}, got {sorted(inner)}")
        value = inner[names[0]]
        if shape is None:
            if layout.mode is ResuMode.QRESU:
                raise ValueError("a QRESU ResuParameter needs its outer `shape`")
            shape = value.shape
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=value.dtype, device=value.device, requires_grad=requires_grad
        )
        self._set_inner(layout, inner)
        return self

    @classmethod
    def from_weight(cls, weight: torch.Tensor, requires_grad: Optional[bool] = None) -> "ResuParameter":
        """A DENSE ResuParameter holding ``weight`` (the storage is reused, not copied)."""
        if not torch.is_floating_point(weight):
            raise ValueError(f"ResuParameter needs a floating-point weight, got dtype {weight.dtype}")
        rg = weight.requires_grad if requires_grad is None else requires_grad
        return cls(ResuLayout(), {"_weight": weight.detach().contiguous()}, requires_grad=rg)

    def _set_inner(self, layout: ResuLayout, inner: dict) -> None:
        """Install ``layout`` and its inner tensors (absent ones become None)."""
        for name in ALL_INNER_NAMES:
            setattr(self, name, inner.get(name))
        self._layout = layout

    def _inner(self) -> dict:
        return {name: getattr(self, name) for name in self._layout.inner_names}

    # ------------------------------------------------------------------ flatten, pickling, repr
    def __tensor_flatten__(self):
        return list(self._layout.inner_names), self._layout

    @staticmethod
    def __tensor_unflatten__(inner, layout, outer_size, outer_stride):
        return ResuParameter(layout, dict(inner), shape=outer_size)

    def _stable_hash_for_caching(self) -> str:
        return f"ResuParameter({self._layout.cache_key()},{tuple(self.shape)},{self.dtype})"

    def __reduce_ex__(self, protocol):
        args = (self._layout.to_dict(), self._inner(), tuple(self.shape), self.requires_grad, getattr(self, "_is_param", False))
        return _rebuild_resu_parameter, args

    def __deepcopy__(self, memo):
        # torch's deepcopy clones the tensor and its __dict__ but not its hooks: register ours again.
        copied = super().__deepcopy__(memo)
        if copied.mode.trains_theta:
            copied._ensure_foreign_grad_hook()
        return copied

    def __repr__(self) -> str:
        extra = ""
        if self._layout.mode.has_mask:
            extra = f", sparsity={self.sparsity:.3f}, mask={self._layout.encoding_name}"
        fmt = self._layout.qformat
        if fmt is not None:
            extra += f", bits={fmt.bits}, scheme={fmt.scheme}"
        return f"ResuParameter(shape={tuple(self.shape)}, dtype={self.dtype}, mode={self._layout.mode.value}{extra})"

    def _map_inner(self, fn, mask_fn=None) -> "ResuParameter":
        """A new ResuParameter (same layout) with ``fn(t, is_value)`` applied to every inner tensor.

        ``is_value`` is True for the tensor that carries the outer dtype (the weight, or θ in QRESU);
        the mask storage takes ``mask_fn`` (default: unchanged).
        """
        names = self._layout.inner_names
        inner = {}
        for name in names:
            t = getattr(self, name)
            if name == "_mask_storage":
                inner[name] = t if mask_fn is None else mask_fn(t)
            else:
                inner[name] = fn(t, name == names[0])
        return ResuParameter(self._layout, inner, shape=self.shape)

    # ------------------------------------------------------------------ public accessors
    @property
    def resu_layout(self) -> ResuLayout:
        """The :class:`~resu.tensors.layout.ResuLayout`: mode, mask encoding, pruned count, quant format."""
        return self._layout

    @property
    def mode(self) -> ResuMode:
        """The current :class:`ResuMode`."""
        return self._layout.mode

    @property
    def mask(self) -> Optional[SparseMask]:
        """The :class:`~resu.tensors.mask.SparseMask` of this weight, None in DENSE mode.

        It shares this parameter's mask storage; treat it as read-only (``update`` on it does not
        change the parameter): change masks with :func:`resu.prune_`.
        """
        if not self.mode.has_mask:
            return None
        return SparseMask.from_storage(self._mask_storage, self._layout.encoding, tuple(self.shape), self.n_pruned)

    @property
    def n_pruned(self) -> int:
        """Number of pruned slots (0 in DENSE mode)."""
        return self._layout.n_pruned

    @property
    def sparsity(self) -> float:
        """Fraction of pruned slots."""
        n = self.numel()
        return self.n_pruned / n if n else 0.0

    @property
    def active_mask(self) -> torch.Tensor:
        """Dense boolean tensor, True at active slots (computed on demand; never stored)."""
        if not self.mode.has_mask:
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
        if self.mode is ResuMode.QRESU:
            return self._theta.detach()
        if self.mode is ResuMode.RESU:
            return self._gather_pruned(self._weight.detach())
        return None

    @property
    def quant_format(self) -> Optional[QuantFormat]:
        """The :class:`~resu.tensors.quantized.QuantFormat` of the frozen active weights in QRESU mode, else None."""
        return self._layout.qformat

    def effective_weight(self) -> torch.Tensor:
        """The dense weight the forward uses (active values, and θ in RESU/QRESU mode), as a detached plain tensor.

        Outside QRESU mode it shares storage with this parameter: treat it as read-only. In QRESU mode
        it is a new tensor: the dequantized active weights merged with θ.
        """
        if self.mode is ResuMode.QRESU:
            with torch.no_grad():
                return self._dequant_merge(self.dtype)
        return self._weight.detach()

    def set_write_policy(self, policy: WritePolicy) -> None:
        """Choose what in-place writes do to this weight in RESU mode (see :class:`~resu.tensors.layout.WritePolicy`).

        The seed API's ``RESULinear.enter_resu_mode(stock_optimizer=True)`` sets ``RESTORE_ACTIVE``;
        leaving RESU mode resets it to ``REFUSE``.
        """
        self._layout = self._layout.replace(write_policy=WritePolicy(policy))

    def set_selective(self, config) -> None:
        """Tag this weight with a RESU-Selective config (a :class:`~resu.optim.selection_config.SelectionConfig`,
        or None to clear it); :class:`resu.ResuAdamW` honours it in groups without their own ``selective``.
        The slot set, and so the optimizer states, are unchanged."""
        self._layout = self._layout.replace(selective=config)

    # ------------------------------------------------------------------ layout fields, by their old names
    # Read-only views of the spec, kept because code outside resu.tensors reads them.
    _mode = property(lambda self: self._layout.mode)
    _encoding = property(lambda self: self._layout.encoding)
    _n_pruned = property(lambda self: self._layout.n_pruned)
    _layout_id = property(lambda self: self._layout.layout_id)
    _qformat = property(lambda self: self._layout.qformat)

    @property
    def _selective(self):
        """The RESU-Selective config this weight was tagged with (``layout.selective``)."""
        return self._layout.selective

    @_selective.setter
    def _selective(self, config) -> None:
        self.set_selective(config)

    # ------------------------------------------------------------------ internal helpers
    def _mask_args(self) -> tuple:
        """``(storage, encoding, numel, n_pruned)``: what the mask kernels take."""
        return self._mask_storage, self._layout.encoding, self.numel(), self.n_pruned

    def _quant_op_args(self) -> tuple:
        """The arguments of ``resu::dequant_merge``/``resu::qlinear`` after ``x`` and before ``bias``."""
        rows, cols = self.shape[0], self.numel() // max(self.shape[0], 1)
        fmt = self._layout.qformat
        return (
            self._qdata, self._qscale, self._qzero, self._theta, self._mask_storage, self._layout.encoding_name,
            self.n_pruned, rows, cols, fmt.bits, fmt.group_cols(cols), fmt.row_stride(cols), fmt.decode,
        )

    def _dequant_merge(self, dtype: torch.dtype) -> torch.Tensor:
        """The QRESU effective weight (this shape) in ``dtype``."""
        return torch.ops.resu.dequant_merge(*self._quant_op_args(), dtype).view(self.shape)

    def _pruned_bool(self) -> torch.Tensor:
        return mask_ops.pruned_bool(*self._mask_args())

    def _pruned_indices(self) -> torch.Tensor:
        return mask_ops.pruned_flat_indices(*self._mask_args())

    def _active_indices(self) -> torch.Tensor:
        return mask_ops.active_flat_indices(*self._mask_args())

    def _gather_pruned(self, dense: torch.Tensor) -> torch.Tensor:
        """The pruned slots of ``dense`` (this weight's shape), ascending: ``resu::gather_masked``, one
        Triton launch on CUDA with a bitmap mask (the optimizer gathers an FSDP2 shard's dense gradient
        with it in every step), the reference elsewhere."""
        layout = self._layout
        return torch.ops.resu.gather_masked(dense, self._mask_storage, layout.encoding_name, layout.n_pruned, True, dense.dtype)

    def _gather_active(self, dense: torch.Tensor) -> torch.Tensor:
        return mask_ops.gather_active(dense.reshape(-1), *self._mask_args())

    def _zero_pruned_(self, dense: torch.Tensor) -> torch.Tensor:
        """Zero the pruned slots of ``dense`` (same shape as this parameter) in place."""
        flat = dense.view(-1)
        flat.copy_(mask_ops.zero_pruned(flat, *self._mask_args()))
        return dense

    def _write_pruned_(self, values: torch.Tensor) -> None:
        """Write ``values`` (ascending flat order) into the pruned slots of the weight, in place."""
        self._weight.view(-1).index_copy_(0, self._pruned_indices(), values.to(self._weight.dtype))

    # ------------------------------------------------------------------ mode transitions
    def _set_layout(self, mode: ResuMode, mask_storage=None, encoding=None, n_pruned: int = 0, quant=None) -> None:
        """Enter ``mode`` with this mask (and quantized state in QRESU): a new slot set, a new layout id.

        The weight (``_weight``) is kept as it is; in QRESU mode ``quant`` replaces it.
        """
        fmt = None if quant is None else quant.fmt
        layout = self._layout.with_mask(mode, encoding if mode.has_mask else None, n_pruned, fmt)
        inner = {"_weight": self._weight, "_mask_storage": mask_storage if mode.has_mask else None}
        if quant is not None:
            inner = {"_qdata": quant.qdata, "_qscale": quant.scale, "_qzero": quant.zero, "_theta": quant.theta,
                     "_mask_storage": mask_storage}
        self._set_inner(layout, inner)
        if mode.trains_theta:
            self._ensure_foreign_grad_hook()

    def _ensure_foreign_grad_hook(self) -> None:
        """Register :func:`compact_foreign_grad` once on this (leaf, trainable) parameter.

        Done on entering RESU mode, and on every new trainable copy (``nn.Parameter(...)``,
        ``copy.deepcopy``, ``model.to(...)``, ``.cuda()``, unpickling): hooks belong to one tensor
        object and are never copied, so each copy registers its own; without it a copy's clip norm
        would include the frozen slots' part of foreign dense gradients. Whether it is registered is
        read off the tensor's own hooks (a flag in ``__dict__`` would be copied while the hook is not).
        """
        if not (self.requires_grad and self.grad_fn is None):
            return
        hooks = self._post_accumulate_grad_hooks
        if hooks is None or not any(h is compact_foreign_grad for h in hooks.values()):
            self.register_post_accumulate_grad_hook(compact_foreign_grad)

    @torch.no_grad()
    def _apply_pruning_(self, pruned: torch.Tensor) -> None:
        """Enter SPARSE mode with ``pruned`` (bool, this shape, True = pruned): pruned slots become 0."""
        storage, encoding = mask_ops.encode_pruned(pruned.reshape(self.shape).to(self.device))
        self._set_layout(ResuMode.SPARSE, storage, encoding, int(pruned.sum()))
        self._zero_pruned_(self._weight)

    def _keep_mask(self, mode: ResuMode, quant: Optional[QuantizedState] = None) -> None:
        self._set_layout(mode, self._mask_storage, self._layout.encoding, self.n_pruned, quant)

    @torch.no_grad()
    def _enter_resu_(self, theta: torch.Tensor) -> None:
        """SPARSE → RESU, writing θ (n_pruned values) into the pruned slots."""
        self._write_pruned_(theta)
        self._keep_mask(ResuMode.RESU)

    @torch.no_grad()
    def _enter_qresu_(self, quant: QuantizedState) -> None:
        """SPARSE → QRESU: keep ``quant`` (codes of the active weights, θ) and free the dense weight."""
        self._keep_mask(ResuMode.QRESU, quant)

    @torch.no_grad()
    def _exit_qresu_(self, commit: bool) -> None:
        """QRESU → DENSE with the dequantized weights and θ merged (commit), or → SPARSE with θ zeroed."""
        weight = self._dequant_merge(self.dtype).contiguous()
        storage, encoding, n_pruned = self._mask_storage, self._layout.encoding, self.n_pruned
        self._set_inner(self._layout, {"_weight": weight})  # the layout is replaced just below
        if commit:
            self._set_layout(ResuMode.DENSE)
        else:
            self._set_layout(ResuMode.SPARSE, storage, encoding, n_pruned)
            self._zero_pruned_(weight)

    @torch.no_grad()
    def _exit_resu_(self, commit: bool) -> None:
        """RESU → DENSE keeping θ (commit) or RESU → SPARSE zeroing it."""
        self.set_write_policy(WritePolicy.REFUSE)  # the opt-in lasts one RESU phase
        if commit:
            self._set_layout(ResuMode.DENSE)
        else:
            self._zero_pruned_(self._weight)
            self._keep_mask(ResuMode.SPARSE)

    # ------------------------------------------------------------------ write policy
    def _refuse_write_in_resu(self, what: str, restorable: bool = False) -> None:
        if restorable and self._restores_active_after_writes():
            return
        if self.mode.trains_theta:
            mode, exit_fn = ("QRESU", "exit_qresu_") if self.mode is ResuMode.QRESU else ("RESU", "exit_resu_")
            raise RuntimeError(
                f"{what} on a ResuParameter in {mode} mode would change its frozen active weights. "
                "To train θ use resu.ResuAdamW (stock torch.optim optimizers update every slot); to change "
                f"the weights, call resu.{exit_fn}(model) first."
            )

    def _restores_active_after_writes(self) -> bool:
        """True for a RESU weight whose write policy is ``RESTORE_ACTIVE``: in-place ops may write into
        it, and its active slots are restored bitwise afterwards (see :mod:`resu.tensors.resu_ops`)."""
        return self.mode is ResuMode.RESU and self._layout.write_policy is WritePolicy.RESTORE_ACTIVE

    # ------------------------------------------------------------------ FSDP2 extension points
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """FSDP2's all-gather input: this row shard's stored tensors (see :mod:`resu.distributed.fsdp`)."""
        from resu.distributed.fsdp import pre_all_gather

        return pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)

    # FSDP2 calls inspect.signature on this hook before every all-gather of every weight (to choose
    # between its two calling conventions); a stored __signature__ answers without re-parsing it.
    fsdp_pre_all_gather.__signature__ = inspect.signature(fsdp_pre_all_gather)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """FSDP2's all-gather output: the full weight on the gathered tensors (see :mod:`resu.distributed.fsdp`)."""
        from resu.distributed.fsdp import post_all_gather

        return post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    # ------------------------------------------------------------------ interception
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return TORCH_FUNCTIONS.lookup(func)(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return ATEN_OPS.lookup(func)(func, args, kwargs or {})


@TORCH_FUNCTIONS.fallback
def run_without_subclass(func, args, kwargs):
    """The default torch-function entry: ``func`` as on plain tensors."""
    # Results are not re-wrapped (unlike the default __torch_function__, which would turn every
    # output into this subclass): what is not in the table runs as usual.
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


_UNPICKLED = "ResuParameter (unpickled)"  # the name is unknown here; load_state_dict names it again


def _rebuild_resu_parameter(layout: dict, inner: dict, shape, requires_grad: bool, is_param: bool = False):
    """Unpickling (``torch.load``, also with ``weights_only=True``): everything is validated before the
    parameter is built, since a pickle is untrusted data and the kernels trust lengths."""
    if not isinstance(layout, dict):
        raise CheckpointError(_UNPICKLED, "layout", "a dict (ResuLayout.to_dict())", type(layout).__name__)
    try:
        spec = ResuLayout.from_dict(layout)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(_UNPICKLED, "layout", "a layout written by resu", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise CheckpointError(_UNPICKLED, "shape", "a tuple of ints", type(shape).__name__)
    validate_resu_layout(_UNPICKLED, spec, tuple(shape), inner)
    p = ResuParameter(spec, dict(inner), shape=torch.Size(shape), requires_grad=bool(requires_grad))
    if is_param:
        p._is_param = True  # what nn.Parameter(subclass) sets: keeps isinstance(p, nn.Parameter) after torch.load
    if p.mode.trains_theta:
        p._ensure_foreign_grad_hook()
    return p


torch.serialization.add_safe_globals([ResuParameter, _rebuild_resu_parameter])

# The handlers: generic aten ops, then each resu op in its own file (they import this module).
import resu.tensors.resu_ops  # noqa: E402,F401
import resu.compile.linear  # noqa: E402,F401
import resu.compile.qlinear  # noqa: E402,F401
