"""resu with PyTorch's own distributed engines: DDP, FSDP2 (``fully_shard``) and ``torch.distributed.checkpoint``.

- :func:`wrap_ddp` / :func:`compact_allreduce_hook`: DDP that broadcasts ResuParameters as they are
  and all-reduces only trainable slots.
- :func:`fully_shard`: FSDP2 with ResuParameters sharded by rows (packed codes, θ and mask bits
  all-gathered, never dense copies in QRESU mode; gradients reduce-scattered as trainable slots);
  ResuAdamW keeps per-shard states.
- :func:`get_state_dict` / :func:`set_state_dict`: ``torch.distributed.checkpoint`` of the model and
  ResuAdamW in a canonical, row-sharded form that reshards (save on N ranks, load on M).
- :func:`broadcast_module_`: make every rank's model equal to one rank's, masks and codes included.
"""

import importlib

import resu.distributed.optim  # noqa: F401  (ResuAdamW over FSDP2's DTensor parameters)
import resu.distributed.row_shards  # noqa: F401  (ResuParameter ops fully_shard calls; refuses torch's own on one)
from resu.distributed.broadcast import broadcast_module_
from resu.distributed.ddp import CompactAllReduceState, compact_allreduce_hook, trainable_flat_index, wrap_ddp

# FSDP2 and DCP pull in torch.distributed.fsdp / checkpoint / tensor (most of a second at import):
# their entry points load on first use.
_LAZY = {"fully_shard": "resu.distributed.fsdp", "get_state_dict": "resu.distributed.dcp",
         "set_state_dict": "resu.distributed.dcp"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resu.distributed' has no attribute {name!r}")


__all__ = [
    "CompactAllReduceState",
    "broadcast_module_",
    "compact_allreduce_hook",
    "fully_shard",
    "get_state_dict",
    "set_state_dict",
    "trainable_flat_index",
    "wrap_ddp",
]
