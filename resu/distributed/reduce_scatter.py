"""FSDP2's gradient reduce-scatter, sending only trainable slots.

FSDP2 lays the gradients of a sharded module out as one flat buffer of ``world`` equal chunks (chunk
r: every parameter's rows for rank r, each padded to its shard size) and reduce-scatters it. For a
ResuParameter most of a chunk is known to be zero or unused: in RESU/QRESU mode only θ (the pruned
slots) trains, in SPARSE mode only the active slots. :class:`CompactReduceScatter`, installed by
:func:`resu.distributed.fully_shard` through FSDP2's ``set_custom_reduce_scatter``, gathers each
chunk's trainable positions into a compact buffer (padded to the largest chunk's count),
reduce-scatters that, and scatters each rank's result back into its dense chunk (zeros elsewhere).
Plain parameters are sent whole.

The positions come from the masks of the full weights (every rank keeps the full weight's mask bits,
joined at the first all-gather). On CUDA, when every masked weight is a bitmap whose rank blocks fill
whole bytes, a plan made once per set of masks (:class:`_Plan`: each (rank, parameter) piece's offsets,
count and bitmap block, see :mod:`resu.compile.triton_shard_pack`) lets one Triton launch pack the send
buffer and one unpack the received values; elsewhere (and as the reference) the masks are decoded at
each call and the slots gathered per rank with torch ops. Only counts and the plan are cached, so no
call after the first reads anything back to the host.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist

from resu.compile import registry
from resu.tensors import mask_kernels as mask_ops
from resu.tensors.mask_kernels import MaskEncoding
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


@dataclasses.dataclass
class _Plan:
    """The Triton exchange of one parameter group for one set of masks (module docstring)."""

    counts: list[int]  # trainable slots of each rank's chunk
    cap: int  # the largest count: every rank's row of the send buffer
    pack: tuple  # (table, program -> piece, program -> block) over every (rank, parameter) piece
    unpack: tuple  # the same over this rank's pieces, offsets read the other way
    keep: list  # the bitmap blocks and block offsets the tables point into


def _pieces(fsdp_params: list, fulls: list, world: int) -> Optional[list[list[tuple]]]:
    """Per rank, per parameter: (offset in the chunk, length, how its slots are chosen, bitmap block or
    None). None when some masked weight cannot take the Triton path (an index-encoded mask, or rank
    blocks that do not fill whole bytes, or padding)."""
    from resu.compile import triton_shard_pack as tsp

    out = [[] for _ in range(world)]
    start = 0
    for fp, full in zip(fsdp_params, fulls):
        size = fp.padded_sharded_param_size.numel()
        if isinstance(full, ResuParameter) and full.mode is not ResuMode.DENSE:
            if full.resu_layout.encoding is not MaskEncoding.BITMAP or full.numel() != size * world or size % 8:
                return None
            how = tsp.PRUNED_SLOTS if full.mode.trains_theta else tsp.ACTIVE_SLOTS
            per_rank = size // 8
            for r in range(world):
                out[r].append((start, size, how, full._mask_storage[r * per_rank: (r + 1) * per_rank]))
        else:
            for r in range(world):
                out[r].append((start, size, tsp.ALL_SLOTS, None))
        start += size
    return out


def _make_plan(pieces: list[list[tuple]], rank: int, device) -> _Plan:
    """Tables and program maps for :mod:`resu.compile.triton_shard_pack` (one host read of the counts)."""
    from resu.compile import triton_shard_pack as tsp
    from resu.compile.triton_bitmap import cached_block_offsets

    world = len(pieces)
    keep, popcounts = [], []
    for r in range(world):
        for start, size, how, bits in pieces[r]:
            if bits is not None:
                popcounts.append(mask_ops._unpack_bits(bits, size).sum())
    counts_flat = torch.stack(popcounts).tolist() if popcounts else []
    it = iter(counts_flat)
    counts = [[] for _ in range(world)]
    for r in range(world):
        for start, size, how, bits in pieces[r]:
            n = size if bits is None else next(it)
            counts[r].append(n if how != tsp.ACTIVE_SLOTS else size - n)
    totals = [sum(c) for c in counts]
    cap = max(totals) if totals else 0
    pack_rows, unpack_rows, pack_sizes, unpack_sizes = [], [], [], []
    chunk = sum(size for _, size, _, _ in pieces[0]) if pieces else 0
    for r in range(world):
        dst = 0
        for (start, size, how, bits), n in zip(pieces[r], counts[r]):
            bits_addr = offsets_addr = 0
            if bits is not None:
                offsets = cached_block_offsets(bits, size, how == tsp.PRUNED_SLOTS)
                keep += [bits, offsets]
                bits_addr, offsets_addr = bits.data_ptr(), offsets.data_ptr()
            pack_rows.append([r * chunk + start, r * cap + dst, size, how, bits_addr, offsets_addr])
            pack_sizes.append(size)
            if r == rank:
                unpack_rows.append([start, dst, size, how, bits_addr, offsets_addr])
                unpack_sizes.append(size)
            dst += n

    def tables(rows, sizes):
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1).to(device)
        return (table, *tsp.program_map(sizes, device))

    return _Plan(totals, cap, tables(pack_rows, pack_sizes), tables(unpack_rows, unpack_sizes), keep)


class CompactReduceScatter(_ReduceScatterBase or object):
    """FSDP2 reduce-scatter of one parameter group that sends trainable slots only (module docstring).

    Args:
        fsdp_params: the group's ``FSDPParam`` objects, in FSDP2's order.
    """

    def __init__(self, fsdp_params: list) -> None:
        self.fsdp_params = list(fsdp_params)
        self._counts_key: Optional[tuple] = None
        self._counts: list[int] = []
        self._counts_masks: list = []
        self._plan_key: Optional[tuple] = None
        self._plan: Optional[_Plan] = None
        #: elements sent by the last call, and what FSDP2's dense reduce-scatter would have sent
        self.last_sent = 0
        self.last_dense = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _fulls_and_key(self, world: int) -> tuple[list, tuple]:
        fulls = [getattr(fp, "_unsharded_param", None) for fp in self.fsdp_params]
        key = tuple(
            (id(f), f.resu_layout.layout_id, id(f._mask_storage)) if isinstance(f, ResuParameter) and f.mode.has_mask
            else (id(f), 0, 0) for f in fulls
        ) + (world,)
        return fulls, key

    def _trainable(self, fulls: list, world: int, device) -> torch.Tensor:
        """(world, chunk) bool: True where a chunk position trains. Rebuilt at each call from the full
        weights' masks (a cache of positions would hold 8 bytes per trainable slot for the whole run)."""
        return torch.cat([
            _trainable_flags(full, world, fp.padded_sharded_param_size.numel(), device)
            for fp, full in zip(self.fsdp_params, fulls)
        ], dim=1)

    def _plan_for(self, fulls: list, key: tuple, world: int, rank: int, device) -> Optional[_Plan]:
        """The Triton exchange's plan for these masks (made at the first call that sees them), or None
        when the reference must run."""
        if (key, rank) != self._plan_key:
            pieces = _pieces(self.fsdp_params, fulls, world)
            self._plan = None if pieces is None else _make_plan(pieces, rank, device)
            self._plan_key = (key, rank)
        return self._plan

    def exchange(self, output_tensor, input_tensor, world: int, rank: int, collective: Callable) -> None:
        """Send the trainable slots of ``input_tensor`` (world chunks), ``collective(recv, send)`` them,
        and write this rank's chunk of the result into ``output_tensor`` (zeros at frozen slots)."""
        fulls, key = self._fulls_and_key(world)
        use_kernels = registry.use_triton(input_tensor, output_tensor)
        plan = self._plan_for(fulls, key, world, rank, input_tensor.device) if use_kernels else None
        if plan is not None:
            from resu.compile.triton_shard_pack import pack_, unpack_

            # Unwritten tails of the rows (ranks with fewer slots than the largest) are never read back.
            send = input_tensor.new_empty(world, plan.cap)
            pack_(input_tensor, send, *plan.pack)
            recv = send.new_empty(plan.cap)
            self.last_sent, self.last_dense = send.numel(), input_tensor.numel()
            collective(recv, send.view(-1))
            unpack_(recv, output_tensor, *plan.unpack)
            return
        trainable = self._trainable(fulls, world, input_tensor.device)
        if key != self._counts_key:  # one host read per set of masks; later calls never sync
            self._counts, self._counts_key = trainable.sum(dim=1).tolist(), key
            # The key holds the masks' ids: keep the masks alive, so no later mask can reuse an id.
            self._counts_masks = [f._mask_storage for f in fulls if isinstance(f, ResuParameter) and f.mode.has_mask]
        chunks = input_tensor.view(world, -1)
        send = input_tensor.new_zeros(world, max(self._counts))
        for r, n in enumerate(self._counts):
            index = torch.nonzero_static(trainable[r], size=n).reshape(n)
            send[r, :n] = chunks[r].index_select(0, index)
            if r == rank:
                mine = index
        recv = send.new_empty(send.shape[1])
        self.last_sent, self.last_dense = send.numel(), input_tensor.numel()
        collective(recv, send.view(-1))
        output_tensor.zero_()
        output_tensor.index_copy_(0, mine, recv[: self._counts[rank]])

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.exchange(output_tensor, input_tensor, world, rank,
                      lambda recv, send: _reduce_scatter(recv, send, op=op, group=group))
        return None


def fsdp_param_group(module):
    """The one FSDP2 parameter group of a module passed to ``fully_shard`` (None when it has none or
    several). Torch 2.11 keeps it as ``_fsdp_param_group``; later versions as a list, ``_fsdp_param_groups``."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return groups[0] if len(groups) == 1 else None


def install_compact_reduce_scatter(module) -> Optional[CompactReduceScatter]:
    """Give ``module`` (just passed to ``fully_shard``) a :class:`CompactReduceScatter` when its own
    parameters include a masked ResuParameter; returns it (None when nothing would be saved, or when
    this torch has no custom reduce-scatter)."""
    if _ReduceScatterBase is None or not hasattr(module, "set_custom_reduce_scatter"):
        return None
    group = fsdp_param_group(module)
    if group is None:
        return None
    fsdp_params = group.fsdp_params
    masked = [fp for fp in fsdp_params
              if isinstance(fp.sharded_param._local_tensor, ResuParameter) and fp.sharded_param._local_tensor.mode.has_mask]
    if not masked:
        return None
    comm = CompactReduceScatter(fsdp_params)
    module.set_custom_reduce_scatter(comm)
    return comm


__all__ = ["CompactReduceScatter", "install_compact_reduce_scatter"]
