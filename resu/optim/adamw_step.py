"""The one AdamW step over trainable slots: where the slots live × which of them a step updates.

Where (the *target*):

- a plain tensor: the slots are its elements (QRESU's flat θ vector ``p._theta``);
- :class:`MaskedSlots`: the pruned (θ of a RESU weight) or active (a SPARSE weight's trainable
  slots) slots of a dense weight, in ascending flat order.

Which (the :class:`Selection`): every slot, a bool mask over the slots, the slots whose int64
selection key is ≥ a 0-d threshold tensor (RESU-Selective's consistency strategy, no host sync), or
k given slot indices (static strategies). Adam states have one entry per slot, except for an index
selection, whose states have k entries (state i belongs to slot ``index[i]``).

:func:`adamw_step_` decides once whether a Triton kernel of :mod:`resu.compile.triton_adamw` or
the reference runs. The reference gathers the updated slots, applies
:func:`resu.compile.adamw_math.adamw_update_` (the math of ``torch.optim.AdamW``) and scatters back;
every Triton kernel is tested against it. :func:`adamw_steps_` steps every slot of many targets at
once (one multi-tensor launch per kind of target on CUDA), with the per-target results.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from resu.compile import registry
from resu.compile.adamw_math import adamw_update_
from resu.tensors import mask_kernels as mask_ops

@dataclasses.dataclass(frozen=True)
class MaskedSlots:
    """The slots of the dense ``weight`` that a mask selects: pruned (``pruned=True``) or active."""

    weight: torch.Tensor
    storage: torch.Tensor
    encoding: mask_ops.MaskEncoding
    n_pruned: int
    pruned: bool = True

    @classmethod
    def theta_of(cls, p) -> "MaskedSlots":
        """The θ slots of a RESU-mode ResuParameter."""
        return cls(p._weight, p._mask_storage, p.resu_layout.encoding, p.n_pruned, True)

    @classmethod
    def active_of(cls, p) -> "MaskedSlots":
        """The trainable (active) slots of a SPARSE-mode ResuParameter."""
        return cls(p._weight, p._mask_storage, p.resu_layout.encoding, p.n_pruned, False)

    def flat_indices(self) -> torch.Tensor:
        """int64 flat positions of the slots in ``weight``, ascending."""
        fn = mask_ops.pruned_flat_indices if self.pruned else mask_ops.active_flat_indices
        return fn(self.storage, self.encoding, self.weight.numel(), self.n_pruned)


Target = Union[torch.Tensor, MaskedSlots]


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which slots of a target one step updates; build with :data:`ALL`, :func:`where`,
    :func:`key_at_least` or :func:`subset`."""

    kind: str = "all"  # "all" | "mask" | "key" | "index"
    tensor: Optional[torch.Tensor] = None  # the bool mask, the int64 keys, or the int64 slot indices
    threshold: Optional[torch.Tensor] = None  # "key": a 0-d int64 tensor on the slots' device
    positions: Optional[torch.Tensor] = None  # "index": where the slots sit in the flattened holder

    def slot_index(self) -> Optional[torch.Tensor]:
        """int64 indices of the updated slots (None: every slot)."""
        if self.kind == "all":
            return None
        if self.kind == "mask":
            return self.tensor.nonzero().squeeze(1)
        if self.kind == "key":
            return (self.tensor >= self.threshold).nonzero().squeeze(1)
        return self.tensor.to(torch.int64)

    def tensors(self) -> tuple:
        return tuple(t for t in (self.tensor, self.threshold, self.positions) if t is not None)


ALL = Selection()


def where(mask: torch.Tensor) -> Selection:
    """The slots where the bool ``mask`` (one entry per slot) is True."""
    return Selection("mask", mask)


def key_at_least(keys: torch.Tensor, threshold: torch.Tensor) -> Selection:
    """The slots whose int64 key is ≥ the 0-d ``threshold`` (read on device)."""
    return Selection("key", keys, threshold)


def subset(index: torch.Tensor, positions: Optional[torch.Tensor] = None) -> Selection:
    """The k distinct slots ``index`` (states sized k); ``positions``: their flat positions in the
    target's holder, if already known."""
    return Selection("index", index, positions=positions)


def holder(target: Target) -> torch.Tensor:
    """The tensor whose storage the slots live in."""
    return target.weight if isinstance(target, MaskedSlots) else target


def positions_in_target(target: Target, slot_index: torch.Tensor) -> torch.Tensor:
    """Where slots ``slot_index`` sit in the flattened holder of ``target``."""
    if isinstance(target, MaskedSlots):
        return target.flat_indices().index_select(0, slot_index)
    return slot_index


@torch.no_grad()
def adamw_step_(
    target: Target,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    selection: Selection = ALL,
    max_exp_avg_sq: Optional[torch.Tensor] = None,
    **hyper,
) -> None:
    """One AdamW step (decoupled weight decay, ``step`` counting from 1) on the selected slots, in place.

    ``grad`` is compact (one value per slot), or weight-shaped for a :class:`MaskedSlots` target;
    ``hyper`` are the keyword hyperparameters of :func:`resu.compile.adamw_math.adamw_update_` (``lr``,
    ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``maximize``). Slots outside the selection, and
    their states, are never written; weight decay applies only to updated slots. ``max_exp_avg_sq``
    (AMSGrad) runs the reference.
    """
    _check(target, grad, exp_avg, exp_avg_sq, selection)
    kernel = _triton_kernel(target, grad, exp_avg, exp_avg_sq, selection, max_exp_avg_sq)
    if kernel is None:
        adamw_reference_(target, grad, exp_avg, exp_avg_sq, step, selection=selection,
                         max_exp_avg_sq=max_exp_avg_sq, **hyper)
    else:
        kernel(target, grad, exp_avg, exp_avg_sq, step, selection, hyper)


@dataclasses.dataclass(frozen=True)
class StepJob:
    """One weight's share of a grouped step: every slot of ``target`` (as :func:`adamw_step_` with
    ``selection=ALL``), at its own ``step``."""

    target: Target
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int


@torch.no_grad()
def adamw_steps_(jobs: list[StepJob], **hyper) -> None:
    """:func:`adamw_step_` on every slot of each job's target: the same math (bitwise the same results
    under Triton's interpreter; on CUDA rounding can differ where the compiler fuses multiply-adds).

    The jobs the multi-tensor kernel (:func:`resu.compile.triton_adamw.grouped_adamw_triton_`) can take
    (fp32 CUDA tensors; compact targets, or bitmap-masked slots) are stepped by one launch per kind of
    target (compact, pruned or active slots; compact or weight-shaped gradient), the others
    one by one. Every job is checked before anything is written."""
    for job in jobs:
        _check(job.target, job.grad, job.exp_avg, job.exp_avg_sq, ALL)
    grouped, seen, again = [], set(), []
    for job in jobs:
        item = _grouped_item(job)
        if item is None:
            adamw_step_(job.target, job.grad, job.exp_avg, job.exp_avg_sq, job.step, **hyper)
        elif (item[1].data_ptr(), item[0] & 3) in seen:
            # The same weight's slots again (a parameter listed twice): a launch steps them once, so the
            # repeat is stepped after it, in list order, as one weight at a time would step them.
            again.append(job)
        else:
            seen.add((item[1].data_ptr(), item[0] & 3))
            grouped.append(item)
    if grouped:
        from resu.compile.triton_adamw import grouped_adamw_triton_

        grouped_adamw_triton_(grouped, **hyper)
    for job in again:
        adamw_step_(job.target, job.grad, job.exp_avg, job.exp_avg_sq, job.step, **hyper)


def _grouped_item(job: StepJob) -> Optional[tuple]:
    """The grouped kernel's description of ``job``, or None when it must be stepped on its own."""
    target, grad = job.target, job.grad.reshape(-1)
    tensors = (holder(target), grad, job.exp_avg, job.exp_avg_sq)
    f32 = torch.float32
    if not (tensors[0].dtype is f32 and grad.dtype is f32 and job.exp_avg.dtype is f32
            and job.exp_avg_sq.dtype is f32 and registry.use_triton(*tensors)):
        return None
    from resu.compile import triton_adamw as ta

    if not isinstance(target, MaskedSlots):
        return (ta.KIND_COMPACT, target, grad, job.exp_avg, job.exp_avg_sq, job.step, None, target.numel())
    if target.encoding is not mask_ops.MaskEncoding.BITMAP:
        return None  # index-encoded masks: the per-weight path
    numel = target.weight.numel()
    kind = ta.KIND_BITMAP_PRUNED if target.pruned else ta.KIND_BITMAP_ACTIVE
    if grad.numel() == numel:
        kind |= ta.GRAD_DENSE
    n_selected = target.n_pruned if target.pruned else numel - target.n_pruned
    return (kind, target.weight, grad, job.exp_avg, job.exp_avg_sq, job.step, target.storage, n_selected)


def _check(target, grad, exp_avg, exp_avg_sq, selection: Selection) -> None:
    """ValueErrors naming the argument, before anything is written."""
    if isinstance(target, MaskedSlots):
        n = target.n_pruned if target.pruned else target.weight.numel() - target.n_pruned
        grad_ok = grad.numel() in (n, target.weight.numel())
    else:
        n = target.numel()
        grad_ok = grad.numel() == n
    if not grad_ok:
        raise ValueError(f"adamw_step_: `grad` has {grad.numel()} values for {n} slots; pass the compact gradient")
    n_states = n
    t = selection.tensor
    if selection.kind == "index":
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"adamw_step_: a `selection` subset needs int64 slot indices, got {t.dtype}")
        n_states = t.numel()
    elif selection.kind == "mask" and (t.dtype != torch.bool or t.numel() != n):
        raise ValueError(f"adamw_step_: a `selection` mask must be bool with one entry per slot ({n}), got {t.dtype} x {t.numel()}")
    elif selection.kind == "key" and t.numel() != n:
        raise ValueError(f"adamw_step_: `selection` keys must have one entry per slot ({n}), got {t.numel()}")
    for name, state in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if state.numel() != n_states:
            raise ValueError(f"adamw_step_: `{name}` must have {n_states} entries, got {state.numel()}")


def _triton_kernel(target, grad, exp_avg, exp_avg_sq, selection, max_exp_avg_sq):
    """The Triton launcher for this step, or None for the reference. The only place that decides."""
    if max_exp_avg_sq is not None:
        return None
    if not registry.use_triton(holder(target), grad, exp_avg, exp_avg_sq, *selection.tensors()):
        return None
    if selection.kind == "index":
        return _indexed
    if not isinstance(target, MaskedSlots):
        return _compact
    if target.encoding is mask_ops.MaskEncoding.BITMAP and selection.kind in ("all", "key"):
        return _bitmap
    if selection.kind == "key":
        return _gathered_compact  # index-encoded masks: θ gathered, stepped by the compact kernel, scattered
    return None


def _compact(target, grad, exp_avg, exp_avg_sq, step, selection, hyper) -> None:
    from resu.compile import triton_adamw as ta

    mode = {"all": ta.SELECT_ALL, "mask": ta.SELECT_MASK, "key": ta.SELECT_KEY}[selection.kind]
    ta.compact_adamw_triton_(target, grad.reshape(-1), exp_avg, exp_avg_sq, step, **hyper, select_mode=mode,
                             selector=selection.tensor, threshold=selection.threshold)


def _indexed(target, grad, exp_avg, exp_avg_sq, step, selection, hyper) -> None:
    from resu.compile.triton_adamw import indexed_adamw_triton_

    index = selection.tensor.to(torch.int64).contiguous()
    positions = selection.positions
    if positions is None:
        positions = positions_in_target(target, index)
    indexed_adamw_triton_(holder(target), positions, grad.reshape(-1), index, exp_avg, exp_avg_sq, step, **hyper)


def _bitmap(target, grad, exp_avg, exp_avg_sq, step, selection, hyper) -> None:
    from resu.compile.triton_adamw import bitmap_adamw_triton_

    n_selected = target.n_pruned if target.pruned else target.weight.numel() - target.n_pruned
    bitmap_adamw_triton_(target.weight, grad, exp_avg, exp_avg_sq, target.storage, target.pruned, step, **hyper,
                         n_selected=n_selected, keys=selection.tensor, threshold=selection.threshold)


def _gathered_compact(target, grad, exp_avg, exp_avg_sq, step, selection, hyper) -> None:
    flat = target.weight.view(-1)
    index = target.flat_indices()
    values = flat.index_select(0, index)
    _compact(values, grad, exp_avg, exp_avg_sq, step, selection, hyper)
    flat.index_copy_(0, index, values)


@torch.no_grad()
def adamw_reference_(target, grad, exp_avg, exp_avg_sq, step, *, selection=ALL, max_exp_avg_sq=None, **hyper) -> None:
    """Reference for :func:`adamw_step_`: gather the updated slots, the AdamW math, scatter back."""
    if isinstance(target, MaskedSlots):
        flat, slot_pos = target.weight.view(-1), target.flat_indices()
    else:
        flat, slot_pos = target, None
    g = grad
    if slot_pos is not None:
        g = grad.reshape(-1)
        if g.numel() == flat.numel() and g.numel() != slot_pos.numel():  # a weight-shaped gradient
            g = g.index_select(0, slot_pos)
    chosen = selection.slot_index()
    if chosen is None and slot_pos is None:  # every element of a plain tensor: in place, as torch.optim.AdamW
        adamw_update_(flat, g.reshape(flat.shape).to(flat.dtype), exp_avg, exp_avg_sq, max_exp_avg_sq, step, **hyper)
        return
    if chosen is None:
        pos = slot_pos
    elif selection.positions is not None:
        pos = selection.positions
    else:
        pos = chosen if slot_pos is None else slot_pos.index_select(0, chosen)
    values = flat.index_select(0, pos)
    g = g.reshape(-1)
    if chosen is not None:
        g = g.index_select(0, chosen)
    per_slot = chosen is not None and selection.kind != "index"  # states sized like the slots: gather them too
    m, v = (exp_avg.index_select(0, chosen), exp_avg_sq.index_select(0, chosen)) if per_slot else (exp_avg, exp_avg_sq)
    adamw_update_(values, g.to(values.dtype), m, v, max_exp_avg_sq, step, **hyper)
    flat.index_copy_(0, pos, values)
    if per_slot:
        exp_avg.index_copy_(0, chosen, m)
        exp_avg_sq.index_copy_(0, chosen, v)


__all__ = ["ALL", "MaskedSlots", "Selection", "StepJob", "Target", "adamw_reference_", "adamw_step_", "adamw_steps_",
           "key_at_least", "positions_in_target", "subset", "where"]
