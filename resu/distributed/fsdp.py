"""FSDP2 (``fully_shard``) with ResuParameters: row shards, and the all-gather extension hooks.

A ResuParameter shards on dim 0 into ResuParameters of its row blocks, each a complete weight of its
own: its rows of the dense weight (SPARSE/RESU) or of the packed codes and scales (QRESU), its θ
values and its rows of the mask, stored as a bitmap so that every rank's mask has the same size.
FSDP2 keeps the shard as the local tensor of a DTensor parameter, and before each forward calls

- :func:`pre_all_gather` (``ResuParameter.fsdp_pre_all_gather``): the shard's inner tensors, padded
  to sizes equal on every rank (θ to the largest shard's θ count), in the compute dtype;
- :func:`post_all_gather` (``ResuParameter.fsdp_post_all_gather``): the full ResuParameter, built on
  the gathered tensors (views where the rank segments line up, else reassembled).

So the all-gather moves what the weight stores: packed codes, scales, θ and mask bits in QRESU mode,
never a dense copy. The gradient of the full weight is a CompactGrad; it enters FSDP2's reduce-scatter
buffer in its dense shape (zeros at frozen slots), and :mod:`resu.distributed.reduce_scatter` sends
only its trainable slots; each rank gets the gradient of its rows.

Each shard's sizes on every rank (θ counts) are known only while the full weight is at hand (in
``fully_shard``), so they are recorded in a table keyed by the shard's layout id; a mask or mode
change of a sharded weight is refused.

Use :func:`fully_shard` (a thin layer over ``torch.distributed.fsdp.fully_shard``): it checks that
every ResuParameter's rows divide evenly over the mesh and turns on the row-sharding ops for the
duration of the call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  (registers torch.ops.fsdp.*)
import torch.nn as nn

from resu.compile import registry
from resu.distributed.reduce_scatter import install_compact_reduce_scatter
from resu.distributed.row_shards import ShardInfo, _give_storage, row_sharding, row_slices, shard_info
from resu.tensors import mask_kernels as mask_ops
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.compact_grad import implements as compact_grad_op
from resu.tensors.mask_kernels import MaskEncoding
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import pack, unpack
from resu.tensors.resu_parameter import ResuParameter


@compact_grad_op(torch.ops.fsdp.chunk_cat.default)
def _chunk_cat(func, args, kwargs):
    """FSDP2's reduce-scatter copy-in: a CompactGrad enters the dense buffer with zeros at its frozen slots."""
    grads = [_dense(g) if isinstance(g, CompactGrad) else g for g in args[0]]
    return func(grads, *args[1:], **kwargs)


def _dense(g: CompactGrad) -> torch.Tensor:
    """``g.to_dense()``; on CUDA with a bitmap mask one Triton launch (this runs for every weight in
    every backward, where the reference's dozen host-side ops kept the GPU waiting)."""
    if g.encoding is MaskEncoding.BITMAP and registry.use_triton(g.values, g.mask_storage):
        from resu.compile.triton_scatter import scatter_bitmap

        return scatter_bitmap(g.values, g.mask_storage, g.numel(), True).view(g.shape)
    return g.to_dense()


# ---------------------------------------------------------------------- all-gather extension hooks
def pre_all_gather(p: ResuParameter, mesh, outer_size, outer_stride, module, mp_policy):
    """``fsdp_pre_all_gather``: the shard's inner tensors, equal-sized on every rank, and metadata."""
    info = shard_info(p) if p.mode.has_mask else None
    param_dtype = getattr(mp_policy, "param_dtype", None) or p.dtype
    if p.mode is ResuMode.QRESU:
        theta = p._theta.to(param_dtype)
        if theta.numel() == info.capacity:  # the largest shard (every shard, when the counts are equal)
            padded = theta
        else:
            padded = theta.new_zeros(info.capacity)
            padded[: theta.numel()] = theta
        scale, zero = p._qscale, p._qzero
        inputs = (p._qdata, scale.reshape(-1) if scale.dim() == 0 else scale,
                  zero.reshape(-1) if zero.dim() == 0 else zero, padded, p._mask_storage)
    elif p.mode.has_mask:
        inputs = (p._weight.to(param_dtype), p._mask_storage)
    else:
        inputs = (p._weight.to(param_dtype),)
    return inputs, (tuple(p.shape), p.mode)


def _join_bitmaps(gathered: torch.Tensor, world: int, local_numel: int, numel: int) -> torch.Tensor:
    """The full weight's bitmap from ``world`` per-shard bitmaps laid end to end (a view when every shard
    fills whole bytes)."""
    if local_numel % 8 == 0:
        return gathered[: mask_ops._bitmap_len(numel)]
    per = gathered.view(world, -1)
    bits = torch.cat([mask_ops._unpack_bits(per[r], local_numel) for r in range(world)])[:numel]
    return mask_ops._encode_as(bits, MaskEncoding.BITMAP)


def _join_codes(gathered: torch.Tensor, world: int, local_numel: int, numel: int, bits: int) -> torch.Tensor:
    """The full weight's packed codes from per-shard packed codes (a view when shards fill whole bytes)."""
    if bits == 8 or local_numel % 2 == 0:
        return gathered[: (numel + 1) // 2 if bits == 4 else numel]
    per = gathered.view(world, -1)
    codes = torch.cat([unpack(per[r], bits, local_numel) for r in range(world)])[:numel]
    return pack(codes, bits)


def post_all_gather(p: ResuParameter, outputs, metadata, param_dtype, *, out: Optional[ResuParameter] = None):
    """``fsdp_post_all_gather``: the full ResuParameter on the gathered tensors, and the tensors FSDP2
    must free and reallocate around each all-gather (those that are not views of its buffers)."""
    local_shape, mode = metadata
    world = len(shard_info(p).theta_counts) if mode.has_mask else outputs[0].shape[0] // local_shape[0]
    rows = local_shape[0] * world
    shape = torch.Size((rows, *local_shape[1:]))
    numel = shape.numel()
    local_numel = torch.Size(local_shape).numel()
    if not mode.has_mask:
        weight = outputs[0]
        if out is not None:
            return None
        return ResuParameter(p.resu_layout, {"_weight": weight}), ()
    info = shard_info(p)
    if out is not None and getattr(out, "_resu_mask_of", None) is info:
        _refill(out, outputs, info, mode, world, local_numel, numel)
        return None
    # The mask is a tensor of its own, not a view of FSDP2's buffers: the CompactGrad of the full weight
    # holds it until the reduce-scatter, after FSDP2 has freed those buffers.
    mask = _join_bitmaps(outputs[-1], world, local_numel, numel).clone()
    owned = []
    full = info.full_layout.replace(n_pruned=sum(info.theta_counts), encoding=MaskEncoding.BITMAP)
    if mode is ResuMode.QRESU:
        fmt = full.qformat
        qdata, scale, zero, theta_padded = outputs[:4]
        codes = _join_codes(qdata, world, local_numel, numel, fmt.bits)
        if not (fmt.bits == 8 or local_numel % 2 == 0):
            owned.append(codes)
        if fmt.scheme == "per_tensor":
            scale, zero = scale[0], zero[0]
        cap = info.capacity
        theta = torch.cat([theta_padded[r * cap: r * cap + n] for r, n in enumerate(info.theta_counts)])
        owned.append(theta)
        inner = {"_theta": theta, "_qdata": codes, "_qscale": scale, "_qzero": zero, "_mask_storage": mask}
    else:
        inner = {"_weight": outputs[0], "_mask_storage": mask}
    if out is not None:
        # A later all-gather into a full weight whose mask came from another ShardInfo (a checkpoint load
        # changed the shards' masks): take the new mask, and copy what is not a view of the new buffers.
        # FSDP2 fills its gathered weight in place, so it can take new mask positions but not a new count
        # of pruned slots (θ's length and the weight's layout) or another mode.
        if mode is not out.mode or full.n_pruned != out.n_pruned:
            raise RuntimeError(
                f"resu.distributed: a sharded weight now has {full.n_pruned} pruned slots in {mode.value} mode, its "
                f"gathered copy {out.n_pruned} in {out.mode.value} mode: a checkpoint with other masks was loaded "
                "(resu.distributed.set_state_dict) into a model that had already run a forward. Load such a "
                "checkpoint into a freshly built and sharded model, before its first forward."
            )
        out._mask_storage = mask
        for name, t in inner.items():
            mine = getattr(out, name)
            if name != "_mask_storage" and mine.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                with torch.autograd._unsafe_preserve_version_counter(mine):
                    mine.copy_(t)
        out._resu_mask_of = info
        return None
    gathered = ResuParameter(full, inner, shape=shape)
    # The mask is joined once per ShardInfo: a sharded weight's mask cannot change (shard_info refuses; a
    # checkpoint load that changes it makes a new ShardInfo). Later all-gathers keep this mask tensor, so
    # the kernels' per-mask caches (block offsets) stay valid from step to step.
    gathered._resu_mask_of = info
    return gathered, tuple(owned)


def _refill(out: ResuParameter, outputs, info: ShardInfo, mode: ResuMode, world: int, local_numel: int, numel: int):
    """A later all-gather into the same full weight (every step): the views of FSDP2's buffers already
    see the new data and the mask is kept; copy in what is not a view (QRESU's θ, codes of odd-sized
    shards). The copies keep version counters, as FSDP2 does for its own buffers: a backward that saved
    these tensors (a compiled block re-gathered in backward) reads the same values again."""
    if mode is not ResuMode.QRESU:
        weight = outputs[0]
        if out._weight.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            with torch.autograd._unsafe_preserve_version_counter(out._weight):
                out._weight.copy_(weight)
        return
    qdata, theta_padded = outputs[0], outputs[3]
    with torch.autograd._unsafe_preserve_version_counter(out._theta):
        if len(set(info.theta_counts)) == 1:  # equal shards: one strided copy
            cap = info.capacity
            out._theta.view(world, cap).copy_(theta_padded.view(world, cap))
        else:
            start, cap = 0, info.capacity
            for r, n in enumerate(info.theta_counts):
                out._theta[start: start + n].copy_(theta_padded[r * cap: r * cap + n])
                start += n
    if out._qdata.untyped_storage().data_ptr() != qdata.untyped_storage().data_ptr():
        codes = _join_codes(qdata, world, local_numel, numel, out.resu_layout.qformat.bits)
        with torch.autograd._unsafe_preserve_version_counter(out._qdata):
            out._qdata.copy_(codes)
    for name, gathered in (("_qscale", outputs[1]), ("_qzero", outputs[2])):
        mine = getattr(out, name)
        if mine.dim() == 0:  # per-tensor: every rank sent the same one value
            gathered = gathered[0]
        if mine.numel() and mine.untyped_storage().data_ptr() != gathered.untyped_storage().data_ptr():
            with torch.autograd._unsafe_preserve_version_counter(mine):
                mine.copy_(gathered.reshape(mine.shape))


# ---------------------------------------------------------------------- fully_shard
def fully_shard(module: nn.Module, *, compact_reduce_scatter: bool = True, **kwargs):
    """``torch.distributed.fsdp.fully_shard(module, **kwargs)`` for modules holding ResuParameters.

    Checks that every ResuParameter not yet sharded has a first dimension divisible by the mesh size
    (FSDP2 pads uneven shards, which a masked weight cannot share storage with), then shards each into
    ResuParameter row blocks (see the module docstring). With ``compact_reduce_scatter`` (default),
    gradients are reduce-scattered as their trainable slots only
    (:class:`~resu.distributed.reduce_scatter.CompactReduceScatter`). Change masks and modes (prune,
    enter RESU or QRESU) before this call; train with :class:`resu.ResuAdamW`, whose states stay per-shard.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from torch.distributed.tensor import DTensor

    mesh = kwargs.get("mesh")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError("resu.distributed.fully_shard: only a 1-D `mesh` (plain FSDP, no HSDP) is supported")
    world = mesh.size() if mesh is not None else dist.get_world_size()
    rank = mesh.get_local_rank() if mesh is not None else dist.get_rank()
    for name, p in module.named_parameters():
        if isinstance(p, DTensor) or not isinstance(p, ResuParameter):
            continue
        if p.dim() == 0 or p.shape[0] % world:
            raise ValueError(
                f"resu.distributed.fully_shard: `{name}` has {p.shape[0] if p.dim() else 0} rows, not divisible by "
                f"the {world} ranks it shards over; pad the layer's out_features to a multiple of {world} or leave "
                "this weight dense (resu.sparsify_(model, filter_fn=...)) before sharding"
            )
    with row_sharding(rank):
        out = torch_fully_shard(module, **kwargs)
    for p in module.parameters():
        if isinstance(p, DTensor) and isinstance(p._local_tensor, ResuParameter):
            _give_storage(p._local_tensor)
    if compact_reduce_scatter:
        install_compact_reduce_scatter(module)
    return out


__all__ = ["ShardInfo", "fully_shard", "post_all_gather", "pre_all_gather", "row_sharding", "row_slices", "shard_info"]
