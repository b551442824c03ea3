"""Make every rank's copy of a model equal to one rank's, ResuParameters included (mode, mask, codes).

DDP's own initial broadcast sends each parameter as a dense tensor, which cannot carry a mask or a
mode, and copying dense values into a RESU/QRESU weight is refused (it would move frozen weights)
unless they are already equal. :func:`broadcast_module_` sends each ResuParameter as what it is: its
layout and inner tensors. After it, replicas are identical, and DDP's own broadcast is a no-op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from resu.tensors.layout import ResuLayout
from resu.tensors.resu_parameter import ResuParameter


def _describe(p: ResuParameter) -> dict:
    inner = {name: (tuple(t.shape), t.dtype) for name, t in p._inner().items()}
    return {"layout": p.resu_layout.to_dict(), "shape": tuple(p.shape), "inner": inner}


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank of ``group``, in place.

    A ResuParameter takes ``src``'s mode, mask, quantized state and layout id (so optimizer states laid
    out on one rank fit every rank); a plain parameter or buffer takes its values. Collective: every
    rank of ``group`` must call it with the same module structure. Returns ``module``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("broadcast_module_: no default process group; call torch.distributed.init_process_group first")
    params = [p for _, p in module.named_parameters(remove_duplicate=True)]
    tensors = params + [b for _, b in module.named_buffers(remove_duplicate=True)]
    is_src = dist.get_rank() == src if group is None else dist.get_rank(group) == dist.get_group_rank(group, src)
    # Layouts differ between ranks before the broadcast (each may have pruned its own mask), so the
    # receivers learn the shapes of the inner tensors first.
    meta = [[_describe(t) if isinstance(t, ResuParameter) else None for t in tensors] if is_src else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    for t, desc in zip(tensors, meta[0]):
        if desc is None:
            if isinstance(t, ResuParameter):
                raise RuntimeError(
                    "broadcast_module_: a weight is a ResuParameter on this rank but not on the source rank; "
                    "call resu.sparsify_ on every rank"
                )
            data = t.detach()
            buf = data if data.is_contiguous() else data.contiguous()
            dist.broadcast(buf, src=src, group=group)
            if buf is not data:
                data.copy_(buf)
            continue
        if not isinstance(t, ResuParameter):
            raise RuntimeError(
                "broadcast_module_: a weight is a ResuParameter on the source rank but not on this one; "
                "call resu.sparsify_ on every rank"
            )
        if is_src:
            inner = {name: x.contiguous() for name, x in t._inner().items()}
        else:
            inner = {name: torch.empty(shape, dtype=dtype, device=t.device) for name, (shape, dtype) in desc["inner"].items()}
        for name in ResuLayout.from_dict(desc["layout"]).inner_names:
            dist.broadcast(inner[name], src=src, group=group)
        if not is_src:
            t.copy_(ResuParameter(ResuLayout.from_dict(desc["layout"]), inner, shape=torch.Size(desc["shape"])))
    return module


__all__ = ["broadcast_module_"]
