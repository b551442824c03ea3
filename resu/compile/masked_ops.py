"""Ops over the slots a mask selects (pruned or active): gather into a compact vector, AdamW step.

Each has a plain-PyTorch reference (the CPU kernel, and the fallback for index encodings) and a
Triton CUDA kernel for bitmap masks (:mod:`resu.compile.triton_bitmap`), chosen at run time. The
gather is a ``torch.library`` custom op so that compiled backward graphs keep it opaque: Inductor
never sees Triton on a machine without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from resu.compile.adamw_math import adamw_update_
from resu.compile.registry import define_op
from resu.tensors import mask as mask_ops

_BITMAP = mask_ops.MaskEncoding.BITMAP.value


def _selected_indices(storage, encoding, numel, n_pruned, select_pruned: bool) -> torch.Tensor:
    if select_pruned:
        return mask_ops.pruned_flat_indices(storage, encoding, numel, n_pruned)
    return mask_ops.active_flat_indices(storage, encoding, numel, n_pruned)


def _use_triton(t: torch.Tensor, encoding: str) -> bool:
    return t.is_cuda and encoding == _BITMAP


def gather_masked_reference(src, storage, encoding, n_pruned, select_pruned, out_dtype):
    """The pruned (``select_pruned``) or active slots of ``src``, ascending flat order, as ``out_dtype``.

    Reference implementation (every device; index encodings on CUDA too).
    """
    flat = src.reshape(-1)
    if select_pruned:
        out = mask_ops.gather_pruned(flat, storage, encoding, flat.numel(), n_pruned)
    else:
        out = mask_ops.gather_active(flat, storage, encoding, flat.numel(), n_pruned)
    return out.to(out_dtype)


def _gather_masked_cuda(src, storage, encoding, n_pruned, select_pruned, out_dtype):
    if encoding != _BITMAP:
        return gather_masked_reference(src, storage, encoding, n_pruned, select_pruned, out_dtype)
    from resu.compile.triton_bitmap import gather_bitmap

    n_sel = n_pruned if select_pruned else src.numel() - n_pruned
    return gather_bitmap(src.contiguous(), storage, n_sel, select_pruned, out_dtype)


def _gather_masked_fake(src, storage, encoding, n_pruned, select_pruned, out_dtype):
    n_sel = n_pruned if select_pruned else src.numel() - n_pruned
    return src.new_empty((n_sel,), dtype=out_dtype)


gather_masked = define_op(
    "gather_masked(Tensor src, Tensor storage, str encoding, int n_pruned, bool select_pruned, "
    "ScalarType out_dtype) -> Tensor",
    gather_masked_reference,
    fake=_gather_masked_fake,
    cuda=_gather_masked_cuda,
)


@torch.no_grad()
def masked_adamw_(
    weight: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: Optional[torch.Tensor],
    storage: torch.Tensor,
    encoding: str,
    n_pruned: int,
    select_pruned: bool,
    step: int,
    **hyper,
) -> None:
    """AdamW on the selected slots of ``weight`` in place; other slots are never written.

    ``grad`` is either compact (one value per selected slot) or dense (weight-shaped); the states
    are compact. Bitmap masks on CUDA take the fused Triton kernel (not for AMSGrad).
    """
    encoding = mask_ops.MaskEncoding(encoding).value
    if max_exp_avg_sq is None and _use_triton(weight, encoding) and weight.is_contiguous():
        from resu.compile.triton_bitmap import adamw_bitmap_

        adamw_bitmap_(weight, grad, exp_avg, exp_avg_sq, storage, select_pruned, step, **hyper)
        return
    masked_adamw_reference_(weight, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, storage, encoding, n_pruned, select_pruned, step, **hyper)


@torch.no_grad()
def masked_adamw_reference_(
    weight, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, storage, encoding, n_pruned, select_pruned, step, **hyper
) -> None:
    """Reference for :func:`masked_adamw_`: gather, the AdamW math of ``torch.optim.AdamW``, scatter back."""
    flat = weight.view(-1)
    idx = _selected_indices(storage, encoding, flat.numel(), n_pruned, select_pruned)
    g = grad.reshape(-1)
    if g.numel() == flat.numel() and g.numel() != idx.numel():
        g = g.index_select(0, idx)
    values = flat.index_select(0, idx)
    adamw_update_(values, g.to(values.dtype), exp_avg, exp_avg_sq, max_exp_avg_sq, step, **hyper)
    flat.index_copy_(0, idx, values)
