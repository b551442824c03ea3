"""``torch.distributed.checkpoint`` (DCP) for models with ResuParameters and their ResuAdamW states.

A ResuParameter's storage depends on its mask (θ and index masks have mask-dependent lengths) and,
under FSDP2, on how it is sharded, so it is saved in a *canonical* form: plain tensors with the
weight's row structure, which DCP shards and reshards by rows like any weight. For a weight ``w``:

- ``w``: the dense values (SPARSE/RESU: the stored weight, θ in the pruned slots; QRESU: θ scattered
  into its slots, zeros elsewhere);
- ``w.resu_mask``: the mask, one bitmap row per weight row (uint8, ``ceil(cols / 8)`` bytes a row);
- QRESU only: ``w.resu_codes`` (packed codes, one packed row per weight row), ``w.resu_qscale`` and
  ``w.resu_qzero`` (per row, or one value for per-tensor scales);
- ``w.resu_layout``: mode, quantization format and RESU-Selective config, as plain data.

ResuAdamW's compact states (one value per trainable slot) are saved scattered into the weight's
shape, zeros at other slots. Under FSDP2 every tensor is a DTensor sharded by rows, so a checkpoint
saved on N ranks loads on M ranks, or in one process without FSDP. ::

    model_sd, optim_sd = resu.distributed.get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    # ... later, on any number of ranks, a model built and prepared the same way (same mode):
    model_sd, optim_sd = resu.distributed.get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    resu.distributed.set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)

Loading needs a model in the checkpoint's mode (and quantization format), since the entries of a
QRESU weight differ from a RESU one; its values and masks are replaced.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint import state_dict as torch_sd
from torch.distributed.tensor import DTensor, Shard

from resu.distributed.row_shards import _SHARDS, ShardInfo
from resu.optim.selection_config import SelectionConfig
from resu.tensors import mask_kernels as mask_ops
from resu.tensors.layout import ResuLayout, new_layout_id
from resu.tensors.mask_kernels import MaskEncoding
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import QuantFormat, pack, unpack
from resu.tensors.resu_parameter import ResuParameter

MASK, CODES, QSCALE, QZERO, LAYOUT = ".resu_mask", ".resu_codes", ".resu_qscale", ".resu_qzero", ".resu_layout"
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


# ---------------------------------------------------------------------- row-wise bit and code packing
def pack_mask_rows(pruned: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool → (rows, ceil(cols / 8)) uint8, bit i of byte j of a row = column 8j + i."""
    rows, cols = pruned.shape
    width = -(-cols // 8)
    padded = torch.zeros(rows, width * 8, dtype=torch.int32, device=pruned.device)
    padded[:, :cols] = pruned.to(torch.int32)
    return (padded.view(rows, width, 8) * _BIT_WEIGHTS.to(pruned.device)).sum(dim=2).to(torch.uint8)


def unpack_mask_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask_rows`."""
    bits = torch.bitwise_and(packed.unsqueeze(2).to(torch.int32), _BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def _pack_code_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) uint8 codes → (rows, packed cols): each row packed on its own."""
    return torch.stack([pack(row, bits) for row in codes]) if codes.shape[0] else codes.new_zeros(0, 0)


def _unpack_code_rows(rows_packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return torch.stack([unpack(row, bits, cols) for row in rows_packed]) if rows_packed.shape[0] else rows_packed.new_zeros(0, cols)


# ---------------------------------------------------------------------- one weight, canonical form
def _rows_cols(p: torch.Tensor) -> tuple[int, int]:
    rows = p.shape[0] if p.dim() else 1
    return rows, (p.numel() // rows if rows else 0)


def _trainable_index(p: ResuParameter) -> Optional[torch.Tensor]:
    if p.mode is ResuMode.DENSE:
        return None
    return p._pruned_indices() if p.mode.trains_theta else p._active_indices()


def _layout_data(p: ResuParameter) -> dict:
    layout = p.resu_layout.to_dict()
    return {k: layout[k] for k in ("mode", "qformat", "selective", "write_policy")}


def canonical_entries(p: ResuParameter) -> dict[str, torch.Tensor]:
    """The canonical tensors of one (local) ResuParameter, keyed by suffix ("" for the values)."""
    rows, cols = _rows_cols(p)
    mode = p.mode
    with torch.no_grad():
        if mode is ResuMode.QRESU:
            values = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            values.index_copy_(0, p._pruned_indices(), p._theta)
            values = values.view(p.shape)
        else:
            values = p._weight.detach()
        out = {"": values}
        if mode.has_mask:
            out[MASK] = pack_mask_rows(p._pruned_bool().view(rows, cols))
        if mode is ResuMode.QRESU:
            fmt = p.resu_layout.qformat
            out[CODES] = _pack_code_rows(unpack(p._qdata, fmt.bits, rows * cols).view(rows, cols), fmt.bits)
            out[QSCALE], out[QZERO] = p._qscale, p._qzero
    return out


def resu_from_canonical(entries: dict, layout_data: dict, shape: torch.Size, encoding=None) -> ResuParameter:
    """A ResuParameter (this shape) from its canonical tensors and layout data; ``encoding`` forces the
    mask encoding (row shards of FSDP2 use bitmaps), else the smallest is chosen."""
    mode = ResuMode(layout_data["mode"])
    fmt = None if layout_data.get("qformat") is None else QuantFormat(**layout_data["qformat"])
    selective = layout_data.get("selective")
    selective = None if selective is None else SelectionConfig.from_dict(selective)
    values = entries[""]
    rows = shape[0] if len(shape) else 1
    cols = values.numel() // rows if rows else 0
    extra = dict(selective=selective, write_policy=layout_data.get("write_policy", "refuse"))
    if not mode.has_mask:
        return ResuParameter(ResuLayout(**extra), {"_weight": values.contiguous()}, shape=shape)
    pruned = unpack_mask_rows(entries[MASK], cols).reshape(-1)
    n_pruned = int(pruned.sum())
    if encoding is None:
        storage, encoding = mask_ops.encode_pruned(pruned)
    else:
        storage = mask_ops._encode_as(pruned, encoding)
    layout = ResuLayout(mode=mode, encoding=encoding, n_pruned=n_pruned, qformat=fmt, **extra)
    if mode is ResuMode.QRESU:
        codes = _unpack_code_rows(entries[CODES], fmt.bits, cols).reshape(-1)
        theta = values.reshape(-1)[pruned.nonzero().reshape(-1)]
        inner = {"_theta": theta.contiguous(), "_qdata": pack(codes, fmt.bits), "_qscale": entries[QSCALE].contiguous(),
                 "_qzero": entries[QZERO].contiguous(), "_mask_storage": storage}
    else:
        inner = {"_weight": values.contiguous(), "_mask_storage": storage}
    return ResuParameter(layout, inner, shape=shape)


# ---------------------------------------------------------------------- DTensor wrapping
def _local(p: torch.Tensor) -> torch.Tensor:
    return p._local_tensor if isinstance(p, DTensor) else p


def _like_param(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (rows of this rank's shard of ``p``) as a DTensor sharded like ``p``; as is without FSDP2.
    Tensors without rows (per-tensor scales) are replicated."""
    if not isinstance(p, DTensor):
        return t
    if t.dim() == 0:
        return DTensor.from_local(t, p.device_mesh, [torch.distributed.tensor.Replicate()], run_check=False)
    shape = (p.shape[0], *t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def _resu_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """FQN → parameter, for parameters that are (or whose local shards are) ResuParameters."""
    return {name: p for name, p in model.named_parameters() if isinstance(_local(p), ResuParameter)}


def _state_to_canonical(state: dict, p: torch.Tensor) -> dict:
    """ResuAdamW state of ``p``: compact vectors scattered into the weight's shape (DTensors under FSDP2)."""
    local = _local(p)
    index = _trainable_index(local) if isinstance(local, ResuParameter) else None
    n = None if index is None else index.numel()
    out = {}
    for key, value in state.items():
        if key == "layout_id":
            continue
        if key in ("subset", "subset_positions"):
            raise NotImplementedError(
                "resu.distributed.get_state_dict: RESU-Selective states of a static strategy (a chosen θ subset) "
                "cannot be resharded; use the 'consistency' strategy, or save with torch.save per rank"
            )
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if n is not None:
                if value.shape != (n,):
                    raise ValueError(f"resu.distributed.get_state_dict: state `{key}` has shape {tuple(value.shape)}, "
                                     f"expected ({n},) for the weight's trainable slots")
                dense = torch.zeros(local.numel(), dtype=value.dtype, device=value.device)
                dense.index_copy_(0, index, value)
                value = dense.view(local.shape)
            value = _like_param(value, p)
        out[key] = value
    return out


def _state_from_canonical(state: dict, p: torch.Tensor) -> dict:
    local = _local(p)
    index = _trainable_index(local) if isinstance(local, ResuParameter) else None
    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor) and value.dim() > 0 and index is not None:
            value = value.reshape(-1).index_select(0, index).clone()
        out[key] = value
    if isinstance(local, ResuParameter):
        out["layout_id"] = local.resu_layout.layout_id
    return out


# ---------------------------------------------------------------------- public API
def get_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, options=None):
    """``(model_state_dict, optimizer_state_dict)`` ready for ``torch.distributed.checkpoint.save`` /
    ``load`` (FQN keys, ResuParameters and their ResuAdamW states in canonical form; see the module
    docstring). Without ``optimizer`` the second item is None. Collective under FSDP2."""
    params = _resu_params(model)
    if optimizer is None:
        msd = torch_sd.get_model_state_dict(model, options=options)
        osd = None
    else:
        msd, osd = torch_sd.get_state_dict(model, optimizer, options=options)
    for fqn, p in params.items():
        if fqn not in msd:
            continue
        del msd[fqn]
        for suffix, t in canonical_entries(_local(p)).items():
            msd[fqn + suffix] = _like_param(t, p)
        msd[fqn + LAYOUT] = _layout_data(_local(p))
    if osd is not None:
        states = osd["state"]
        named = dict(model.named_parameters())
        for fqn, state in list(states.items()):
            if fqn in named:
                states[fqn] = _state_to_canonical(state, named[fqn])
    return msd, osd


def _install(p: torch.Tensor, new_local: ResuParameter) -> None:
    """Make ``p`` (a ResuParameter, or a DTensor whose local shard is one) hold ``new_local``."""
    target = _local(p)
    with torch.no_grad():
        target.copy_(new_local)  # adopts mode, mask, values (the weight's storage is kept when it fits)
    target.grad = None
    if isinstance(p, DTensor):
        p.grad = None


def set_state_dict(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    model_state_dict: dict[str, Any],
    optim_state_dict: Optional[dict] = None,
    options=None,
) -> None:
    """Load what :func:`get_state_dict` produced (typically filled by ``dcp.load``) into ``model`` and
    ``optimizer``: each ResuParameter takes the saved mode, mask and values (its own rows under FSDP2),
    and ResuAdamW's states are laid out for them. Collective under FSDP2."""
    msd = dict(model_state_dict)
    params = _resu_params(model)
    world = dist.get_world_size() if dist.is_initialized() and any(isinstance(p, DTensor) for p in params.values()) else 1
    for fqn, p in params.items():
        if fqn + LAYOUT not in msd:
            raise KeyError(f"resu.distributed.set_state_dict: no `{fqn}{LAYOUT}` entry; the state dict was not made by "
                           "resu.distributed.get_state_dict (or the model's mode differs from the checkpoint's)")
        layout_data = msd.pop(fqn + LAYOUT)
        entries = {}
        for suffix in ("", MASK, CODES, QSCALE, QZERO):
            if fqn + suffix in msd:
                t = msd.pop(fqn + suffix)
                entries[suffix] = t.to_local() if isinstance(t, DTensor) else t
        local = _local(p)
        sharded = isinstance(p, DTensor)
        new = resu_from_canonical(entries, layout_data, local.shape, MaskEncoding.BITMAP if sharded else None)
        if sharded:
            _record_shards(new, p, world)
        _install(p, new)
    if msd:
        model.load_state_dict(msd, strict=False)
    if optimizer is not None and optim_state_dict is not None:
        named = dict(model.named_parameters())
        osd = {"state": {}, "param_groups": optim_state_dict["param_groups"]}
        for fqn, state in optim_state_dict["state"].items():
            osd["state"][fqn] = _state_from_canonical(state, named[fqn]) if fqn in named else state
        torch_sd.set_optimizer_state_dict(model, optimizer, osd, options=options)


def _record_shards(new: ResuParameter, p: DTensor, world: int) -> None:
    """Register the θ counts of every rank's shard of ``p`` for FSDP2's all-gather (one all-gather)."""
    counts = torch.tensor([new.n_pruned], dtype=torch.int64, device=new.device)
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=p.device_mesh.get_group())
    full = new.resu_layout.replace(layout_id=new_layout_id())
    _SHARDS[new.resu_layout.layout_id] = ShardInfo(tuple(int(c) for c in gathered), full)


__all__ = ["canonical_entries", "get_state_dict", "pack_mask_rows", "resu_from_canonical", "set_state_dict", "unpack_mask_rows"]
