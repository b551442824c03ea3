"""DDP with ResuParameters: the initial broadcast, and a communication hook that all-reduces only trainable slots.

DDP's reducer copies every gradient into a dense bucket. For a ResuParameter most of it is known to
be zero or unused: in RESU/QRESU mode only θ (the pruned slots) trains, in SPARSE mode only the active
slots. :func:`compact_allreduce_hook` gathers, per bucket, just those slots (all of a plain
parameter) into one compact buffer, all-reduces it, and scatters the mean back; the frozen slots are
never sent. A CompactGrad then takes its θ values back from the bucket (``grad.copy_(bucket)``).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from resu.distributed.broadcast import broadcast_module_
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.compact_grad import implements as compact_grad_op
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter


@compact_grad_op(torch.ops.aten.mul.out)
def _mul_into_dense(func, args, kwargs):
    """``torch.mul(grad, 1 / world, out=bucket)``: DDP's default reducer copying a CompactGrad into its
    dense bucket. Writing into a dense ``out`` is fine; writing into a CompactGrad is not."""
    out = kwargs.get("out")
    if isinstance(out, CompactGrad):
        raise RuntimeError("aten.mul.out would write into a CompactGrad; scale it in place with mul_ instead")
    dense = [a.to_dense() if isinstance(a, CompactGrad) else a for a in args]
    return func(*dense, out=out)


def trainable_flat_index(p: torch.Tensor) -> Optional[torch.Tensor]:
    """int64 flat positions of the slots of ``p`` that train (θ in RESU/QRESU, active in SPARSE);
    None when every slot trains (a plain parameter, or DENSE mode)."""
    if not isinstance(p, ResuParameter) or p.mode is ResuMode.DENSE:
        return None
    return p._pruned_indices() if p.mode.trains_theta else p._active_indices()


class CompactAllReduceState:
    """State of :func:`compact_allreduce_hook`: the process group, and the slot indices of each
    parameter, cached per layout (recomputed when a mask or mode changes)."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group
        self._index: dict[int, tuple[int, Optional[torch.Tensor]]] = {}
        #: elements sent by the last call (compact) and what a dense all-reduce would have sent
        self.last_sent = 0
        self.last_dense = 0

    def index_of(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        layout = p.resu_layout.layout_id if isinstance(p, ResuParameter) else 0
        cached = self._index.get(id(p))
        if cached is None or cached[0] != layout:
            cached = (layout, trainable_flat_index(p))
            self._index[id(p)] = cached
        return cached[1]


def compact_allreduce_hook(state: CompactAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean over ranks of each gradient's trainable slots; other slots become 0.

    Register with ``ddp_model.register_comm_hook(CompactAllReduceState(), compact_allreduce_hook)``
    (:func:`wrap_ddp` does). Plain parameters are all-reduced whole, as DDP's default hook does.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    params = bucket.parameters()
    if not params:  # the reducer did not say which parameters the bucket holds: reduce it whole
        fut = dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    pieces, slots, offset = [], [], 0
    for p in params:
        flat = buffer.narrow(0, offset, p.numel())
        offset += p.numel()
        index = state.index_of(p)
        pieces.append(flat if index is None else flat.index_select(0, index))
        slots.append((flat, index))
    compact = torch.cat(pieces).div_(world)
    state.last_sent, state.last_dense = compact.numel(), buffer.numel()
    fut = dist.all_reduce(compact, group=group, async_op=True).get_future()

    def unpack(f: torch.futures.Future) -> torch.Tensor:
        reduced = f.value()[0]
        start = 0
        for flat, index in slots:
            n = flat.numel() if index is None else index.numel()
            values = reduced.narrow(0, start, n)
            start += n
            if index is None:
                flat.copy_(values)
            else:
                flat.zero_()
                flat.index_copy_(0, index, values)
        return buffer

    return fut.then(unpack)


def wrap_ddp(
    module: nn.Module,
    *,
    compact: bool = True,
    process_group: Optional[dist.ProcessGroup] = None,
    **ddp_kwargs,
) -> DistributedDataParallel:
    """``DistributedDataParallel(module, **ddp_kwargs)`` for a model with ResuParameters.

    First makes every rank's replica equal to rank 0's (:func:`broadcast_module_`: masks, modes and
    quantized codes included), then builds DDP, and with ``compact=True`` registers
    :func:`compact_allreduce_hook` so that only trainable slots are all-reduced. Every DDP option
    (``find_unused_parameters``, ``static_graph``, ``no_sync``, ``torch.compile``) works as usual.
    """
    broadcast_module_(module, src=0, group=process_group)
    ddp = DistributedDataParallel(module, process_group=process_group, **ddp_kwargs)
    if compact:
        ddp.register_comm_hook(CompactAllReduceState(process_group), compact_allreduce_hook)
    return ddp


__all__ = ["CompactAllReduceState", "compact_allreduce_hook", "trainable_flat_index", "wrap_ddp"]
