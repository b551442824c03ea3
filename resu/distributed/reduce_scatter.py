"""FSDP2's gradient reduce-scatter, sending only trainable slots.

FSDP2 lays the gradients of a sharded module out as one flat buffer of ``world`` equal chunks (chunk
r: every parameter's rows for rank r, each padded to its shard size) and reduce-scatters it. For a
ResuParameter most of a chunk is known to be zero or unused: in RESU/QRESU mode only θ (the pruned
slots) trains, in SPARSE mode only the active slots. :class:`CompactReduceScatter`, installed by
:func:`resu.distributed.fully_shard` through FSDP2's ``set_custom_reduce_scatter``, gathers each
chunk's trainable positions into a compact buffer (padded to the largest chunk's count),
reduce-scatters that, and scatters each rank's result back into its dense chunk (zeros elsewhere).
Plain parameters are sent whole.

The positions come from the masks of the full weights, which every rank holds while the module is
unsharded; they are computed once per set of masks (masks do not change under FSDP2).
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


def _trainable_rows(full: torch.Tensor, rank: int, world: int, padded_numel: int, device) -> torch.Tensor:
    """Positions, within rank ``rank``'s padded shard of ``full``, of the slots that train."""
    if not isinstance(full, ResuParameter) or full.mode is ResuMode.DENSE:
        return torch.arange(padded_numel, device=device)
    rows = full.shape[0] // world
    cols = full.numel() // full.shape[0]
    pruned = full._pruned_bool().view(full.shape[0], cols)[rank * rows:(rank + 1) * rows].reshape(-1)
    keep = pruned if full.mode.trains_theta else ~pruned
    return keep.nonzero().reshape(-1).to(device)


class CompactReduceScatter(_ReduceScatterBase or object):
    """FSDP2 reduce-scatter of one parameter group that sends trainable slots only (module docstring).

    Args:
        fsdp_params: the group's ``FSDPParam`` objects, in FSDP2's order.
    """

    def __init__(self, fsdp_params: list) -> None:
        self.fsdp_params = list(fsdp_params)
        self._plan_key: Optional[tuple] = None
        self._index: Optional[torch.Tensor] = None  # (world, n_max) positions in each chunk
        self._valid: Optional[torch.Tensor] = None  # (world, n_max) bool: a real position, not padding
        self._counts: list[int] = []
        #: elements sent by the last call, and what FSDP2's dense reduce-scatter would have sent
        self.last_sent = 0
        self.last_dense = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _plan(self, world: int, device) -> None:
        fulls = [fp._unsharded_param if hasattr(fp, "_unsharded_param") else None for fp in self.fsdp_params]
        key = tuple(
            (id(f), f.resu_layout.layout_id if isinstance(f, ResuParameter) else 0, world) for f in fulls
        )
        if key == self._plan_key:
            return
        per_rank = []
        for r in range(world):
            pieces, offset = [], 0
            for fp, full in zip(self.fsdp_params, fulls):
                padded = fp.padded_sharded_param_size.numel()
                pieces.append(offset + _trainable_rows(full, r, world, padded, device))
                offset += padded
            per_rank.append(torch.cat(pieces))
        self._counts = [int(p.numel()) for p in per_rank]
        n_max = max(self._counts)
        self._index = torch.zeros(world, n_max, dtype=torch.int64, device=device)
        self._valid = torch.zeros(world, n_max, dtype=torch.bool, device=device)
        for r, positions in enumerate(per_rank):
            self._index[r, : positions.numel()] = positions
            self._valid[r, : positions.numel()] = True
        self._plan_key = key

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self._plan(world, input_tensor.device)
        chunks = input_tensor.view(world, -1)
        send = torch.where(self._valid, chunks.gather(1, self._index), 0).contiguous()
        recv = send.new_empty(send.shape[1])
        self.last_sent, self.last_dense = send.numel(), input_tensor.numel()
        _reduce_scatter(recv, send.view(-1), op=op, group=group)
        n = self._counts[rank]
        output_tensor.zero_()
        output_tensor.index_copy_(0, self._index[rank, :n], recv[:n])
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
