"""FSDP2's gradient reduce-scatter, sending only trainable slots.

FSDP2 lays the gradients of a sharded module out as one flat buffer of ``world`` equal chunks (chunk
r: every parameter's rows for rank r, each padded to its shard size) and reduce-scatters it. For a
ResuParameter most of a chunk is known to be zero or unused: in RESU/QRESU mode only θ (the pruned
slots) trains, in SPARSE mode only the active slots. :class:`CompactReduceScatter`, installed by
:func:`resu.distributed.fully_shard` through FSDP2's ``set_custom_reduce_scatter``, gathers each
chunk's trainable positions into a compact buffer (padded to the largest chunk's count),
reduce-scatters that, and scatters each rank's result back into its dense chunk (zeros elsewhere).
Plain parameters are sent whole.

The positions come from the masks of the full weights (every rank keeps the full weight's mask bits
from the last all-gather), rebuilt at each call; only their counts are cached, so no call after the
first reads anything back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

try:  # the interface FSDP2 calls custom collectives through (torch >= 2.9)
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch: fully_shard keeps its dense reduce-scatter
    _ReduceScatterBase = None

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _trainable_flags(full: torch.Tensor, world: int, padded_numel: int, device) -> torch.Tensor:
    """(world, padded_numel) bool: row r is rank r's padded shard of ``full``, True at the slots that
    train. The mask is decoded once for all ranks (each rank's rows are a contiguous block of it)."""
    if not isinstance(full, ResuParameter) or full.mode is ResuMode.DENSE:
        return torch.ones(world, padded_numel, dtype=torch.bool, device=device)
    pruned = full._pruned_bool().reshape(world, -1)  # rows split evenly over the ranks
    keep = pruned if full.mode.trains_theta else ~pruned
    if keep.shape[1] < padded_numel:
        keep = torch.cat([keep, keep.new_zeros(world, padded_numel - keep.shape[1])], dim=1)
    return keep.to(device)


class CompactReduceScatter(_ReduceScatterBase or object):
    """FSDP2 reduce-scatter of one parameter group that sends trainable slots only (module docstring).

    Args:
        fsdp_params: the group's ``FSDPParam`` objects, in FSDP2's order.
    """

    def __init__(self, fsdp_params: list) -> None:
        self.fsdp_params = list(fsdp_params)
        self._counts_key: Optional[tuple] = None
        self._counts: list[int] = []
        #: elements sent by the last call, and what FSDP2's dense reduce-scatter would have sent
        self.last_sent = 0
        self.last_dense = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _trainable(self, world: int, device) -> torch.Tensor:
        """(world, chunk) bool: True where a chunk position trains. Rebuilt at each call from the full
        weights' masks (a cache of positions would hold 8 bytes per trainable slot for the whole run)."""
        fulls = [getattr(fp, "_unsharded_param", None) for fp in self.fsdp_params]
        trainable = torch.cat([
            _trainable_flags(full, world, fp.padded_sharded_param_size.numel(), device)
            for fp, full in zip(self.fsdp_params, fulls)
        ], dim=1)
        key = tuple((id(f), f.resu_layout.layout_id if isinstance(f, ResuParameter) else 0) for f in fulls) + (world,)
        return trainable, key

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        trainable, key = self._trainable(world, input_tensor.device)
        if key != self._counts_key:  # one host read per set of masks; later calls never sync
            self._counts, self._counts_key = trainable.sum(dim=1).tolist(), key
        chunks = input_tensor.view(world, -1)
        send = input_tensor.new_zeros(world, max(self._counts))
        for r, n in enumerate(self._counts):
            index = torch.nonzero_static(trainable[r], size=n).reshape(n)
            send[r, :n] = chunks[r].index_select(0, index)
            if r == rank:
                mine = index
        recv = send.new_empty(send.shape[1])
        self.last_sent, self.last_dense = send.numel(), input_tensor.numel()
        _reduce_scatter(recv, send.view(-1), op=op, group=group)
        output_tensor.zero_()
        output_tensor.index_copy_(0, mine, recv[: self._counts[rank]])
        return None


def install_compact_reduce_scatter(module) -> Optional[CompactReduceScatter]:
    """Give ``module`` (just passed to ``fully_shard``) a :class:`CompactReduceScatter` when its own
    parameters include a masked ResuParameter; returns it (None when nothing would be saved, or when
    this torch has no custom reduce-scatter)."""
    if _ReduceScatterBase is None or not hasattr(module, "set_custom_reduce_scatter"):
        return None
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    if len(groups) != 1:
        return None
    fsdp_params = groups[0].fsdp_params
    masked = [fp for fp in fsdp_params
              if isinstance(fp.sharded_param._local_tensor, ResuParameter) and fp.sharded_param._local_tensor.mode.has_mask]
    if not masked:
        return None
    comm = CompactReduceScatter(fsdp_params)
    module.set_custom_reduce_scatter(comm)
    return comm


__all__ = ["CompactReduceScatter", "install_compact_reduce_scatter"]
