"""``resu::gather_masked``: the pruned (or active) slots of a dense tensor, as a compact vector.

What turns a dense weight gradient into the θ gradient of a RESU/QRESU weight
(:mod:`resu.compile.linear`, :func:`resu.tensors.resu_parameter.compact_foreign_grad`). It has a
plain-PyTorch reference (the CPU kernel, and the CUDA fallback for index encodings) and a Triton CUDA
kernel for bitmap masks (:mod:`resu.compile.triton_bitmap`). It is a ``torch.library`` custom op so
that compiled backward graphs keep it opaque: Inductor never sees Triton on a machine without a GPU.
It is never called with a ResuParameter argument, so it has no entry in its dispatch table.
"""

from __future__ import annotations

import torch

from resu.compile.registry import define_op
from resu.tensors import mask_kernels as mask_ops

_BITMAP = mask_ops.MaskEncoding.BITMAP.value


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
