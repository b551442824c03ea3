"""``scatter_bitmap`` (Triton, run by the interpreter here) against the reference scatter into zeros."""

from __future__ import annotations

import pytest
import torch

from resu.compile.triton_scatter import scatter_bitmap
from resu.tensors import mask_kernels as mask_ops


@pytest.mark.parametrize("numel", [1, 7, 8, 1000, 1024, 3000])
@pytest.mark.parametrize("select_pruned", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_matches_the_reference(numel, select_pruned, dtype):
    g = torch.Generator().manual_seed(numel * 2 + select_pruned)
    pruned = torch.rand(numel, generator=g) < torch.rand((), generator=g)
    storage = mask_ops._encode_as(pruned, mask_ops.MaskEncoding.BITMAP)
    selected = pruned if select_pruned else ~pruned
    values = torch.randn(int(selected.sum()), generator=g).to(dtype)
    want = torch.zeros(numel, dtype=dtype)
    want[selected] = values
    got = scatter_bitmap(values, storage, numel, select_pruned)
    assert got.dtype == dtype and torch.equal(got, want)
    n = int(pruned.sum())
    ref = (mask_ops.scatter_pruned if select_pruned else mask_ops.scatter_active)(
        torch.zeros(numel, dtype=dtype), values, storage, mask_ops.MaskEncoding.BITMAP, numel, n
    )
    assert torch.equal(got, ref)


def test_scatter_refuses_a_bitmap_of_the_wrong_length():
    storage = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="storage"):
        scatter_bitmap(torch.zeros(2), storage, 30, True)
    with pytest.raises(ValueError, match="values"):
        scatter_bitmap(torch.zeros(2, 2), storage, 20, True)


def test_fsdp_gradient_copy_in_takes_the_kernel(monkeypatch):
    """FSDP2's copy-in of a compact gradient on a bitmap mask runs ``scatter_bitmap`` (CUDA's path,
    forced here on the interpreter) and gives ``to_dense()``'s tensor."""
    from resu.compile import registry
    from resu.distributed import fsdp
    from resu.tensors.compact_grad import CompactGrad

    g = torch.Generator().manual_seed(3)
    pruned = torch.rand(12, 40, generator=g) < 0.5
    storage = mask_ops._encode_as(pruned, mask_ops.MaskEncoding.BITMAP)
    grad = CompactGrad(torch.randn(int(pruned.sum()), generator=g), storage, mask_ops.MaskEncoding.BITMAP, pruned.shape)
    calls = []
    import resu.compile.triton_scatter as kernel

    real = kernel.scatter_bitmap
    monkeypatch.setattr(kernel, "scatter_bitmap", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    got = fsdp._dense(grad)
    assert calls == [1]
    assert got.shape == pruned.shape and torch.equal(got, grad.to_dense())
