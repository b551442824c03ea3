"""Triton bitmap kernels against their PyTorch references, on fresh random inputs.

On CPU they run under ``TRITON_INTERPRET=1`` (set by conftest); on a GPU they run compiled
(``pytest -m cuda`` picks the CUDA-parametrized cases).
"""

import pytest
import torch

from resu.compile.linear import gather_masked_reference
from resu.optim.adamw_step import MaskedSlots, adamw_reference_
from resu.tensors import mask as mask_ops

triton_bitmap = pytest.importorskip("resu.compile.triton_bitmap")
triton_adamw = pytest.importorskip("resu.compile.triton_adamw")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
SHAPES = [(1, 1), (3, 5), (33, 65), (17, 1000), (64, 129)]
SPARSITIES = [0.0, 0.3, 0.5, 0.97, 1.0]


def _bitmap_mask(shape, sparsity, device, seed):
    g = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    k = int(round(sparsity * numel))
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=g)[:k]] = True
    storage = mask_ops._encode_as(pruned.view(shape), mask_ops.MaskEncoding.BITMAP).to(device)
    return storage, k, pruned.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("select_pruned", [True, False])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_gather_matches_reference(device, shape, sparsity, select_pruned, dtypes):
    src_dtype, out_dtype = dtypes
    storage, k, pruned = _bitmap_mask(shape, sparsity, device, seed=hash((shape, sparsity)) % 1000)
    src = torch.randn(shape, device=device).to(src_dtype)
    n_sel = k if select_pruned else src.numel() - k
    got = triton_bitmap.gather_bitmap(src, storage, n_sel, select_pruned, out_dtype)
    ref = gather_masked_reference(src, storage, "bitmap", k, select_pruned, out_dtype)
    expected = src.reshape(-1)[pruned if select_pruned else ~pruned].to(out_dtype)
    assert got.shape == ref.shape == expected.shape
    assert torch.equal(got, ref) and torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5), (33, 65), (64, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("select_pruned", [True, False])
@pytest.mark.parametrize("compact_grad", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_adamw_matches_reference(device, shape, sparsity, select_pruned, compact_grad, maximize):
    storage, k, pruned = _bitmap_mask(shape, sparsity, device, seed=7)
    sel = pruned if select_pruned else ~pruned
    n_sel = int(sel.sum())
    w = torch.randn(shape, device=device)
    grad = torch.randn(n_sel, device=device) if compact_grad else torch.randn(shape, device=device)
    m, v = torch.randn(n_sel, device=device), torch.rand(n_sel, device=device)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=maximize)
    w_ref, m_ref, v_ref = w.clone(), m.clone(), v.clone()
    slots = MaskedSlots(w_ref, storage, mask_ops.MaskEncoding.BITMAP, k, select_pruned)
    adamw_reference_(slots, grad, m_ref, v_ref, 3, **hyper)
    w_before = w.clone()
    triton_adamw.bitmap_adamw_triton_(w, grad, m, v, storage, select_pruned, 3, **hyper)
    flat_sel = sel.reshape(shape)
    assert torch.equal(w[~flat_sel], w_before[~flat_sel])  # unselected slots never written
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    if n_sel:
        assert not torch.equal(w[flat_sel], w_before[flat_sel])


@pytest.mark.parametrize("select_pruned", [True, False])
def test_block_offsets_are_exclusive_prefix_counts(select_pruned):
    shape = (37, 300)  # several blocks, last one partial
    storage, k, pruned = _bitmap_mask(shape, 0.4, "cpu", seed=3)
    sel = (pruned if select_pruned else ~pruned).to(torch.int32)
    block = triton_bitmap.BLOCK
    n_blocks = -(-sel.numel() // block)
    expected = torch.stack([sel[: i * block].sum() for i in range(n_blocks)]).to(torch.int32)
    assert torch.equal(triton_bitmap.block_offsets(storage, sel.numel(), select_pruned), expected)


def test_offsets_cache_follows_the_storage_tensor():
    """Cached per storage object: reused while it lives unchanged, recomputed after an in-place write,
    dropped when the storage dies."""
    storage, k, pruned = _bitmap_mask((40, 90), 0.5, "cpu", seed=11)
    numel = 40 * 90
    first = triton_bitmap.cached_block_offsets(storage, numel, True)
    assert triton_bitmap.cached_block_offsets(storage, numel, True) is first
    storage[0] ^= 0xFF  # flip 8 slots in place
    again = triton_bitmap.cached_block_offsets(storage, numel, True)
    assert again is not first
    assert torch.equal(again, triton_bitmap.block_offsets(storage, numel, True))
    key = (id(storage), True, triton_bitmap.BLOCK)
    assert key in triton_bitmap._OFFSETS_CACHE
    del storage
    assert key not in triton_bitmap._OFFSETS_CACHE
