"""Row shards of a ResuParameter, and the aten ops FSDP2's sharding calls on one.

:func:`row_slices` cuts a ResuParameter into ResuParameters of its row blocks (see
:mod:`resu.distributed.fsdp`). ``fully_shard`` reaches it through ``torch.chunk``; the handlers here
turn ``split`` / ``new_zeros`` / full-range ``narrow`` of a ResuParameter into row shards only within
:func:`row_sharding` (which :func:`resu.distributed.fully_shard` sets), and otherwise behave as before
(the dense weight's result). Torch's own ``fully_shard`` on a masked ResuParameter would shard its
dense values as a plain weight, silently dropping mask and mode: that is refused with a clear error.

This module is imported with :mod:`resu` (it is light), so that refusal is always in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types

import torch

from resu.tensors import mask_kernels as mask_ops
from resu.tensors.layout import ResuLayout, new_layout_id
from resu.tensors.mask_kernels import MaskEncoding
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import pack, unpack
from resu.tensors.resu_parameter import ATEN_OPS, ResuParameter
from resu.tensors.resu_ops import _run_on_effective_weight

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What every rank knows about one sharded weight: each shard's θ count, and the full layout."""

    theta_counts: tuple[int, ...]
    full_layout: ResuLayout

    @property
    def capacity(self) -> int:
        """θ values each rank sends (the largest shard's count): all-gather inputs are equal-sized."""
        return max(self.theta_counts)


_SHARDS: dict[int, ShardInfo] = {}  # shard layout id -> ShardInfo


class _RowSharding:
    """Whether :func:`row_sharding` is on, this rank's index in the mesh, and the last row split made."""

    active = False
    rank = 0
    last_split: list = []


@contextlib.contextmanager
def row_sharding(rank: int):
    """Within it, ``torch.chunk`` / ``split`` of a ResuParameter on dim 0 give ResuParameter row shards,
    and ``new_zeros`` of the shard size is this ``rank``'s shard: FSDP2's ``_init_sharded_param`` pads
    each shard into a new tensor, which for an evenly sharded weight is the shard itself."""
    saved = (_RowSharding.active, _RowSharding.rank, _RowSharding.last_split)
    _RowSharding.active, _RowSharding.rank, _RowSharding.last_split = True, rank, []
    try:
        yield
    finally:
        _RowSharding.active, _RowSharding.rank, _RowSharding.last_split = saved


def shard_info(p: ResuParameter) -> ShardInfo:
    """The :class:`ShardInfo` of a row shard made by :func:`fully_shard`."""
    info = _SHARDS.get(p.resu_layout.layout_id)
    if info is None:
        raise RuntimeError(
            "a ResuParameter sharded by FSDP2 changed its mask or mode after fully_shard (prune_, enter_resu_, "
            "commit_ ...). Change masks and modes before resu.distributed.fully_shard, on the unsharded model."
        )
    return info


# ---------------------------------------------------------------------- row slices
def _rows_cols(p: torch.Tensor) -> tuple[int, int]:
    rows = p.shape[0]
    return rows, (p.numel() // rows if rows else 0)


def _theta_offsets(pruned_rows: torch.Tensor) -> list[int]:
    """Cumulative θ count before each row (θ is in flat row-major order, so a row block's θ is contiguous)."""
    per_row = pruned_rows.sum(dim=1).tolist()
    out = [0]
    for n in per_row:
        out.append(out[-1] + int(n))
    return out


def row_slices(p: ResuParameter, bounds: list[tuple[int, int]]) -> list[ResuParameter]:
    """ResuParameters holding rows ``start:stop`` of ``p`` for each bound, masks as bitmaps."""
    rows, cols = _rows_cols(p)
    layout = p.resu_layout
    if not layout.mode.has_mask:
        return [ResuParameter(layout.replace(layout_id=new_layout_id()), {"_weight": p._weight[a:b].clone()})
                for a, b in bounds]
    pruned = p._pruned_bool().view(rows, cols)
    theta_at = _theta_offsets(pruned)
    counts = tuple(theta_at[b] - theta_at[a] for a, b in bounds)
    full = layout.replace(encoding=MaskEncoding.BITMAP)
    if layout.mode is ResuMode.QRESU:
        fmt = layout.qformat
        codes = unpack(p._qdata, fmt.bits, rows * cols).view(rows, cols)
    shards = []
    for (a, b), n in zip(bounds, counts):
        mask = mask_ops._encode_as(pruned[a:b], MaskEncoding.BITMAP)
        shard_layout = layout.replace(encoding=MaskEncoding.BITMAP, n_pruned=n, layout_id=new_layout_id())
        shape = (b - a, *p.shape[1:])
        if layout.mode is ResuMode.QRESU:
            per_row = fmt.scheme != "per_tensor"
            inner = {
                "_theta": p._theta[theta_at[a]:theta_at[b]].clone(),
                "_qdata": pack(codes[a:b], fmt.bits),
                "_qscale": p._qscale[a:b].clone() if per_row else p._qscale.clone(),
                "_qzero": p._qzero[a:b].clone() if per_row else p._qzero.clone(),
                "_mask_storage": mask,
            }
        else:
            inner = {"_weight": p._weight[a:b].clone(), "_mask_storage": mask}
        shard = ResuParameter(shard_layout, inner, shape=torch.Size(shape))
        _SHARDS[shard_layout.layout_id] = ShardInfo(counts, full)
        shards.append(shard)
    return shards


@ATEN_OPS.implements([aten.split.Tensor, aten.split_with_sizes.default])
def _split(func, args, kwargs):
    """Row blocks of a ResuParameter (within :func:`row_sharding`); the dense weight's blocks otherwise."""
    p = args[0]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if not (_RowSharding.active and isinstance(p, ResuParameter) and dim in (0, -p.dim())):
        return _run_on_effective_weight(func, args, kwargs)
    sizes = args[1]
    rows = p.shape[0]
    if func is aten.split.Tensor:
        sizes = [min(sizes, rows - start) for start in range(0, rows, sizes)] if rows else [0]
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    _RowSharding.last_split = row_slices(p, bounds)
    return list(_RowSharding.last_split)


@ATEN_OPS.implements(aten.new_zeros.default)
def _new_zeros(func, args, kwargs):
    """Within :func:`row_sharding`: this rank's shard, when the size is the shard's (FSDP2's "padded"
    shard of an evenly sharded weight, which then copies the shard into itself); otherwise zeros as
    for the dense weight."""
    p, size = args[0], args[1]
    shards = _RowSharding.last_split
    if _RowSharding.active and isinstance(p, ResuParameter) and len(shards) > _RowSharding.rank:
        mine = shards[_RowSharding.rank]
        if tuple(mine.shape) == tuple(size):
            # A new wrapper on the same inner tensors: ``split`` returned ``mine`` as an autograd view of
            # the full weight, and FSDP2 keeps ``shard.view(-1)`` for the whole run, which would keep the
            # full weight (and its dense values) alive on every rank through the view's base.
            mine = ResuParameter(mine.resu_layout, mine._inner(), shape=mine.shape)
            _give_storage(mine)
            return mine
    if not _RowSharding.active and isinstance(p, ResuParameter) and p.mode.has_mask and _in_fsdp_sharding():
        raise RuntimeError(
            f"torch.distributed.fsdp.fully_shard on a ResuParameter in {p.mode.name} mode would shard its dense "
            "values as a plain weight (losing its mask and mode); call resu.distributed.fully_shard instead "
            "(same arguments)"
        )
    return _run_on_effective_weight(func, args, kwargs)


def _in_fsdp_sharding(depth: int = 6) -> bool:
    """Whether FSDP2's ``_init_sharded_param`` is among the last few callers."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_sharded_param" and "fsdp" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@ATEN_OPS.implements(aten.slice.Tensor)
def _slice(func, args, kwargs):
    """Within :func:`row_sharding`, a full-range ``narrow`` / slice is an alias of the ResuParameter
    (FSDP2 narrows its evenly padded shards to their full length); any other slice reads the dense weight."""
    p = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start", 0)
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    if _RowSharding.active and isinstance(p, ResuParameter) and step == 1 and start in (0, None):
        size = p.shape[dim]
        if end is None or end >= size:
            return p._map_inner(lambda t, _: t)
    return _run_on_effective_weight(func, args, kwargs)


def _value_storage(p: ResuParameter):
    return getattr(p, p.resu_layout.inner_names[0]).untyped_storage()


def _flat_value_view(p: ResuParameter, *shape):
    """``view(-1)`` of an FSDP2 local QRESU shard: its θ (the one value tensor it stores), not a dense
    dequantized copy that FSDP2 would keep for the whole run as the shard's "flat data"."""
    if p.mode is ResuMode.QRESU and tuple(shape) in ((-1,), ((-1,),)):
        return p._theta.view(-1)
    return torch.Tensor.view(p, *shape)


def _give_storage(local: ResuParameter) -> None:
    """Let FSDP2's local shard answer ``untyped_storage()`` (and ``view(-1)``) with its value tensor.

    FSDP2 keeps ``shard.view(-1)`` as the shard's flat data and compares its storage with the shard's
    when it re-pads shards (lazy init, ``load_state_dict``, ``model.to``); a wrapper subclass has no
    storage of its own. Only the local shards FSDP2 holds get these (instance attributes), so
    ResuParameters elsewhere are unchanged.
    """
    local.untyped_storage = types.MethodType(_value_storage, local)
    local.view = types.MethodType(_flat_value_view, local)


@ATEN_OPS.implements(aten.as_strided.default)
def _as_strided(func, args, kwargs):
    """``as_strided`` to the parameter's own contiguous geometry is an alias of it (FSDP2 calls it on the
    full weight after each all-gather); any other reads the dense weight."""
    p, size, stride = args[0], args[1], args[2]
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0)
    if isinstance(p, ResuParameter) and tuple(size) == tuple(p.shape) and tuple(stride) == tuple(p.stride()) and not offset:
        return p._map_inner(lambda t, _: t)
    return _run_on_effective_weight(func, args, kwargs)


__all__ = ["ShardInfo", "row_sharding", "row_slices", "shard_info"]
