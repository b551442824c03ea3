"""RESU-Selective under FSDP2: the thresholds of a sharded weight, chosen over every rank's θ slots.

A selective step keeps the k largest selection keys of a weight's θ gradient (``k`` a fraction of
its θ slots). Under FSDP2 each rank holds a row shard and its θ slots; ranking each shard on its own
would keep the top fraction of every shard rather than of the weight. Here each rank's keys carry
their slot's index in the whole weight's θ order (a row shard's θ is a contiguous run of it), and
:func:`kth_largest_across` finds the exact k-th largest key of all ranks together: a radix select,
8 bits a round, one all-reduce of a 256-bin histogram per round (8 rounds), everything on the device.
The selected slots are then those of a one-process step on the same gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from resu.distributed.optim import shard_mesh
from resu.distributed.row_shards import shard_info
from resu.tensors.resu_parameter import ResuParameter

# Selection keys are non-negative int64 (bit 63 clear), ranked here 8 bits at a time from the top.
_DIGIT_BITS = 8
_SHIFTS = tuple(range(64 - _DIGIT_BITS, -1, -_DIGIT_BITS))
# The low 32 bits of a key hold the complement of the slot's index in the whole weight.
_MAX_SLOTS = 1 << 32


@dataclasses.dataclass(frozen=True)
class ShardSelection:
    """Where one rank's θ slots sit in a sharded weight's θ: ``offset`` (θ slots on earlier ranks),
    ``n_total`` (θ slots of the whole weight), and the process ``group`` of the shards."""

    group: Optional[dist.ProcessGroup]
    offset: int
    n_total: int


def shard_selection_of(opt, p: torch.Tensor) -> Optional[ShardSelection]:
    """The :class:`ShardSelection` of ``p`` during a step of the ResuAdamW ``opt`` when ``p`` is an FSDP2
    row shard (:func:`resu.distributed.optim.shard_mesh`); None otherwise."""
    mesh = shard_mesh(opt, p)
    if mesh is None or not isinstance(p, ResuParameter):
        return None
    counts = shard_info(p).theta_counts
    n_total = sum(counts)
    if n_total > _MAX_SLOTS:
        raise ValueError(
            f"RESU-Selective: a sharded weight has {n_total} θ slots; selection keys index at most {_MAX_SLOTS} "
            "slots of one weight. Split the layer, or train it without selective updates"
        )
    rank = mesh.get_local_rank()
    return ShardSelection(group=mesh.get_group(), offset=sum(counts[:rank]), n_total=n_total)


@torch.no_grad()
def kth_largest_across(keys: torch.Tensor, k: int, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The k-th largest of the keys ≥ 0 held by all ranks of ``group`` together (entries of −1 are
    masked out), as a 0-d int64 tensor on ``keys``' device; −1 when the ranks hold fewer than k such
    keys. Every rank passes its own keys and gets the same answer. No host read of device data."""
    if k < 1:
        raise ValueError(f"kth_largest_across: `k` must be ≥ 1, got {k}")
    keys = keys.reshape(-1)
    valid = keys >= 0
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)
    need = torch.full((), k, dtype=torch.int64, device=keys.device)
    found = None
    for shift in _SHIFTS:
        digit = (keys >> shift) & 255
        match = valid if shift == _SHIFTS[0] else valid & ((keys >> (shift + _DIGIT_BITS)) == prefix)
        hist = torch.zeros(256, dtype=torch.int64, device=keys.device).scatter_add_(0, digit, match.to(torch.int64))
        dist.all_reduce(hist, group=group)
        at_least = hist.flip(0).cumsum(0)  # at_least[i]: matching keys whose digit is ≥ 255 - i
        if found is None:
            found = at_least[-1] >= need
        i = (at_least < need).sum().clamp(max=255).view(1)  # the first i with at_least[i] ≥ need
        d = 255 - i
        # The keys with a larger digit rank above the answer. gather, not at_least[i]: indexing with a
        # tensor reads the index on the host (a sync that would wait for the all-reduce).
        need = need - (at_least.gather(0, i) - hist.gather(0, d)).view(())
        prefix = (prefix << _DIGIT_BITS) | d.view(())
    return torch.where(found, prefix, torch.full_like(prefix, -1))


__all__ = ["ShardSelection", "kth_largest_across", "shard_selection_of"]
