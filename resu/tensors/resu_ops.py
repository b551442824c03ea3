"""What generic torch ops mean for a :class:`~resu.tensors.resu_parameter.ResuParameter`.

Entries of its two tables: ``p[i] = v`` and ``p.data = t`` (torch functions, caught before autograd),
and the aten ops ``detach``/``clone``/``_to_copy`` (keep the subclass), ``copy_`` (what
``load_state_dict`` calls: adopts mode and mask), read-only ops (run on the effective dense weight),
and the fallback for everything else. The ``resu::`` ops register their own entries in their files
(:mod:`resu.compile.linear`).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ATEN_OPS, TORCH_FUNCTIONS, ResuParameter, run_without_subclass
from resu.tensors.validate import validate_parameter

aten = torch.ops.aten


def unwrap(t):
    """A ResuParameter as its effective dense weight (the stored one outside QRESU); anything else as is."""
    if not isinstance(t, ResuParameter):
        return t
    return t._weight if t._weight is not None else t.effective_weight()


# ---------------------------------------------------------------------- torch functions
@TORCH_FUNCTIONS.implements(torch._C.TensorBase.__setitem__)
def _setitem(func, args, kwargs):
    """``p[index] = value``: writes the weight; SPARSE keeps pruned slots at zero; refused in RESU."""
    p, index, value = args
    if not isinstance(p, ResuParameter):
        return run_without_subclass(func, args, kwargs)
    p._refuse_write_in_resu("item assignment")
    if torch.is_grad_enabled() and p.requires_grad:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    p._weight[index] = unwrap(value)
    if p.mode is ResuMode.SPARSE:
        p._zero_pruned_(p._weight)


@TORCH_FUNCTIONS.implements(torch.Tensor.data.__set__)
def _set_data(func, args, kwargs):
    """``p.data = new``: same shape, dtype and device only (the wrapper's metadata is fixed).

    From a ResuParameter, takes its inner tensors and layout (keeping this weight's selective tag and
    write policy). From a plain tensor: DENSE shares its storage (as ``.data =`` does); SPARSE copies it
    and keeps pruned slots at zero; RESU refuses.
    """
    p, new = args
    if not isinstance(p, ResuParameter):
        return run_without_subclass(func, args, kwargs)
    if (new.shape, new.dtype, new.device) != (p.shape, p.dtype, p.device):
        raise RuntimeError(
            f"cannot assign .data of shape {tuple(new.shape)}, {new.dtype}, {new.device} to a ResuParameter of "
            f"shape {tuple(p.shape)}, {p.dtype}, {p.device}; use resu.densify_ to get plain parameters"
        )
    if isinstance(new, ResuParameter):
        kept = dict(selective=p.resu_layout.selective, write_policy=p.resu_layout.write_policy)
        p._set_inner(new.resu_layout.replace(**kept), new._inner())
        if p.mode.trains_theta:
            p._ensure_foreign_grad_hook()
        return
    p._refuse_write_in_resu("assigning .data")
    if p.mode is ResuMode.SPARSE:
        p._weight = new.detach().clone().contiguous()
        p._zero_pruned_(p._weight)
    else:
        p._weight = new.detach().contiguous()


@TORCH_FUNCTIONS.implements(torch.Tensor.requires_grad_)
def _requires_grad_(func, args, kwargs):
    """``requires_grad_``, then the RESU gradient hook on the result if it is now a trainable leaf.

    Every new trainable copy passes here: ``nn.Parameter(p)``, ``copy.deepcopy``, and ``model.to()``
    / ``.cuda()`` / ``to_empty()`` (which wrap the moved weight in a new ``nn.Parameter``). Hooks are
    never copied with a tensor, so each copy registers its own and trains exactly like the original.
    """
    out = run_without_subclass(func, args, kwargs)
    if isinstance(out, ResuParameter) and out.mode.trains_theta:
        out._ensure_foreign_grad_hook()
    return out


# ---------------------------------------------------------------------- aten: keep the subclass
@ATEN_OPS.implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    return args[0]._map_inner(lambda t, _: func(t))


@ATEN_OPS.implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._map_inner(lambda t, _: t.clone(), lambda m: m.clone())


@ATEN_OPS.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """dtype/device moves keep the subclass (``model.to(...)``, ``.cuda()``, ``.bfloat16()``).

    The dtype applies to the weight (θ in QRESU mode); codes, scales and the mask only move device.
    """
    device = kwargs.get("device")
    move = (lambda t: t.to(device=device)) if device is not None else None
    return args[0]._map_inner(lambda t, is_value: func(t, **kwargs) if is_value else (move(t) if move else t), move)


@ATEN_OPS.implements(aten.empty_like.default)
def _empty_like(func, args, kwargs):
    """``torch.empty_like(p)`` (what ``model.to_empty(device=...)`` calls) keeps the subclass and layout.

    Values (weight, θ, codes, scales) are left uninitialized, as for any tensor. The mask is not a value
    to initialize but part of the layout the kernels index with, so it is carried over; a mask on the
    ``meta`` device has no data to carry, and that case is refused.
    """
    p = args[0]
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if p.mode.has_mask and p._mask_storage.device.type == "meta" and torch.device(device or p.device).type != "meta":
        raise RuntimeError(
            f"empty_like / to_empty of a ResuParameter in {p.mode.name} mode on the meta device: its mask has no "
            "data, so the weight's layout would be undefined. Call resu.sparsify_ on the meta model, materialize it "
            "(to_empty), load the weights, then prune; or load a state_dict that carries the masks."
        )
    move = (lambda t: t.to(device=device)) if device is not None else (lambda t: t)

    def values(t, is_value):
        return torch.empty_like(t, device=device, dtype=dtype if is_value else None)

    return p._map_inner(values, lambda m: move(m).clone())


@ATEN_OPS.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    """``dst.copy_(src)``; what ``load_state_dict`` calls.

    From a ResuParameter the destination also takes the source's mode and mask, so loading a
    checkpoint into a freshly sparsified model restores it exactly. From a plain tensor only the
    values change (SPARSE mode keeps its pruned slots at zero).
    """
    dst, src = args[0], args[1]
    if not isinstance(dst, ResuParameter):
        return func(dst, unwrap(src), **kwargs)
    if isinstance(src, ResuParameter):
        _adopt_copy(dst, src)
        return dst
    if dst.mode.trains_theta:
        if _same_as_effective(dst, src):
            return dst  # a no-op write (DDP's initial broadcast between identical replicas): nothing frozen moves
        raise RuntimeError(
            f"copying a plain tensor into a ResuParameter in {dst.mode.name} mode (load_state_dict of a dense "
            "checkpoint?) would overwrite its frozen active weights and θ. Load it before resu.enter_resu_ / "
            "resu.enter_qresu_, or load a state_dict saved from a model with ResuParameters (it carries mode and mask). "
            "Replicas that differ (DDP's initial broadcast): call resu.distributed.broadcast_module_(model) first."
        )
    return _run_on_effective_weight(func, args, kwargs)


def _same_as_effective(dst: ResuParameter, src) -> bool:
    """True when the plain tensor ``src`` holds exactly ``dst``'s effective weight (copying it changes nothing)."""
    if not isinstance(src, torch.Tensor) or (src.shape, src.dtype, src.device) != (dst.shape, dst.dtype, dst.device):
        return False
    with torch.no_grad():
        return bool(torch.equal(src, dst.effective_weight()))


def _adopt_copy(dst: ResuParameter, src: ResuParameter) -> None:
    """Make ``dst`` a copy of ``src`` (values, mode, mask, quantized state) on ``dst``'s device and dtype.

    ``src`` may come from a checkpoint: it is validated first, before anything changes (``load_state_dict``
    validates every entry earlier still, under its key, through the hook :func:`resu.sparsify_` registers).
    """
    validate_parameter("copy_ source", src)
    device = dst.device
    inner = {}
    for name in src.resu_layout.inner_names:
        t = getattr(src, name)
        mine = getattr(dst, name)
        if name == "_weight" and mine is not None and mine.shape == t.shape:
            mine.copy_(t)  # in place: keeps the storage the parameter already had
            inner[name] = mine
        else:
            is_value = name in ("_weight", "_theta")
            inner[name] = t.to(device=device, dtype=dst.dtype if is_value else t.dtype, copy=True)
    if (src.mode, src.resu_layout.layout_id) != (dst.mode, dst.resu_layout.layout_id):
        dst.grad = None
    kept = dict(selective=dst.resu_layout.selective, write_policy=dst.resu_layout.write_policy)
    dst._set_inner(src.resu_layout.replace(**kept), inner)
    if dst.mode.trains_theta:
        dst._ensure_foreign_grad_hook()


# ---------------------------------------------------------------------- aten: run on the dense weight
@ATEN_OPS.implements(
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
    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


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


@ATEN_OPS.fallback
def _run_on_effective_weight(func, args, kwargs):
    """Ops without a handler run on the effective dense weight.

    In-place ops write through to the weight. In SPARSE mode the pruned slots are re-zeroed after,
    so the SPARSE invariant holds; in RESU mode they are refused, since they would move frozen
    active weights (this is what stops a stock optimizer from decaying them). A RESU weight whose
    write policy is ``RESTORE_ACTIVE`` takes the write instead, and gets its active values back
    bitwise right after it (gathered before the op, scattered back after).
    """
    mutated = _mutated_resu_params(func, args, kwargs)
    for p in mutated:
        p._refuse_write_in_resu(f"in-place {func}", restorable=True)
    frozen = [_save_active(p) for p in mutated if p._restores_active_after_writes()]
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    for p in mutated:
        if p.mode is ResuMode.SPARSE:
            p._zero_pruned_(p._weight)
    for flat, index, values in frozen:
        flat.index_copy_(0, index, values)
    if mutated and isinstance(out, torch.Tensor) and out is mutated[0]._weight:
        return mutated[0]
    return out


def _save_active(p: ResuParameter) -> tuple:
    """``(flat weight, active flat indices, their current values)``: what restores the active slots."""
    flat = p._weight.view(-1)
    index = p._active_indices()
    return flat, index, flat.index_select(0, index)
