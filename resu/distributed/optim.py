"""ResuAdamW over FSDP2's DTensor parameters: each rank steps its own shard, states stay per-shard.

FSDP2 gives the optimizer DTensor parameters whose local tensors are the rank's row shards (a
ResuParameter shard for a ResuParameter), with DTensor gradients. ResuAdamW works on local tensors:
around each :meth:`~resu.ResuAdamW.step` of an optimizer holding DTensors, a step pre-hook puts each
DTensor's local shard (with its local gradient) in its place and moves its state under it, and the
post-hook puts everything back. States are thus local compact vectors of the rank's slots: nothing
is ever gathered. During the step :func:`shard_mesh` tells which mesh a local shard belongs to, so
that RESU-Selective ranks its keys over every rank's shard (:mod:`resu.distributed.select`).
:mod:`resu.distributed.dcp` turns the states into DTensors for checkpoints.

Every ResuAdamW registers the two hooks on itself (:func:`attach_dtensor_hooks`, from its
``__init__`` and ``__setstate__``); other optimizers never see them. They return at once while
DTensor's module is not loaded (no DTensor can exist then).
"""

from __future__ import annotations

import sys
import weakref

_SWAPPED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MESHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> {id(local shard): mesh}


def shard_mesh(opt, local):
    """The device mesh of the DTensor whose local shard ``local`` is, during a step of ``opt``; None
    for a parameter that is not an FSDP2 shard (or outside a step)."""
    return _MESHES.get(opt, {}).get(id(local))


def _dtensor_type():
    """DTensor, if its module is loaded (no DTensor can exist otherwise); None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _to_local(opt, args, kwargs) -> None:
    DTensor = _dtensor_type()
    if DTensor is None:
        return
    swapped, meshes = [], {}
    for group in opt.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if not isinstance(p, DTensor):
                continue
            local = p._local_tensor
            grad = p.grad
            local.grad = None if grad is None else grad._local_tensor
            meshes[id(local)] = p.device_mesh
            if p in opt.state:
                opt.state[local] = opt.state.pop(p)
            params[i] = local
            swapped.append((params, i, p, local))
    if swapped:
        _SWAPPED[opt] = swapped
        _MESHES[opt] = meshes  # rebuilt at every step, so a step that raised leaves nothing stale behind


def _to_dtensor(opt, args, kwargs) -> None:
    swapped = _SWAPPED.pop(opt, None)
    for params, i, p, local in swapped or ():
        if local in opt.state:
            opt.state[p] = opt.state.pop(local)
        local.grad = None
        params[i] = p
    _MESHES.pop(opt, None)


def attach_dtensor_hooks(opt) -> None:
    """Register the step pre/post hooks on the optimizer ``opt`` (a ResuAdamW)."""
    opt.register_step_pre_hook(_to_local)
    opt.register_step_post_hook(_to_dtensor)


__all__ = ["attach_dtensor_hooks", "shard_mesh"]
