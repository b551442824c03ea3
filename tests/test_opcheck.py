"""``torch.library.opcheck`` on every ``resu::`` op: schema, fake (meta) kernel, autograd registration
and AOT dispatch agree with the real kernel, on fresh random inputs.

``qlinear`` and ``dequant_merge`` are checked in ``test_triton_qresu.py`` beside their Triton kernel.
"""

import pytest
import torch

import resu  # noqa: F401  (registers the ops)
from resu.tensors import mask as mask_ops


def _bitmap_or_indices(shape, sparsity, encoding, seed):
    g = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    k = int(round(sparsity * numel))
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=g)[:k]] = True
    return mask_ops._encode_as(pruned.view(shape), encoding), k


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_linear_passes_opcheck(bias, compute_dtype):
    x = torch.randn(3, 4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True) if bias else None
    if compute_dtype is not None:
        x, b = x.detach().to(compute_dtype), None if b is None else b.detach().to(compute_dtype)
    torch.library.opcheck(torch.ops.resu.linear.default, (x, w, b, compute_dtype))


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_linear_backward_ops_pass_opcheck(compute_dtype):
    grad_out = torch.randn(3, 4, 8)
    x = torch.randn(3, 4, 16)
    w = torch.randn(8, 16)
    if compute_dtype is not None:
        grad_out, x = grad_out.to(compute_dtype), x.to(compute_dtype)
    torch.library.opcheck(torch.ops.resu.linear_input_grad.default, (grad_out, w, compute_dtype))
    torch.library.opcheck(torch.ops.resu.linear_weight_grad.default, (grad_out, x, w))


@pytest.mark.parametrize("encoding", list(mask_ops.MaskEncoding), ids=lambda e: e.value)
@pytest.mark.parametrize("select_pruned", [True, False])
def test_gather_masked_passes_opcheck(encoding, select_pruned):
    storage, k = _bitmap_or_indices((12, 20), 0.4, encoding, seed=5)
    src = torch.randn(12, 20)
    args = (src, storage, encoding.value, k, select_pruned, torch.float32)
    torch.library.opcheck(torch.ops.resu.gather_masked.default, args)
    got = torch.ops.resu.gather_masked(*args)
    pruned = mask_ops.pruned_bool(storage, encoding, src.numel(), k)
    assert torch.equal(got, src.reshape(-1)[pruned if select_pruned else ~pruned])


def test_every_resu_op_has_an_opcheck():
    """A new ``resu::`` op must be added to the checks above (or beside its kernel's tests)."""
    checked = {"linear", "linear_input_grad", "linear_weight_grad", "gather_masked", "qlinear", "dequant_merge"}
    defined = {name for name in dir(torch.ops.resu) if isinstance(getattr(torch.ops.resu, name), torch._ops.OpOverloadPacket)}
    assert defined == checked
