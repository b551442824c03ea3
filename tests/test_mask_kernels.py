"""Tests of the mask encodings and the kernels over them (resu/tensors/mask_kernels.py).

Every expected value is computed independently from a dense boolean
reference (boolean indexing, ``nonzero``, numpy) rather than written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resu.tensors.mask import (
    MaskEncoding,
    SparseMask,
    _encode_as,
    active_flat_indices,
    choose_encoding,
    encode_pruned,
    gather_active,
    gather_pruned,
    pruned_bool,
    pruned_flat_indices,
    scatter_active,
    scatter_pruned,
    zero_pruned,
)

ENCODINGS = list(MaskEncoding)
PREFERENCE = [MaskEncoding.PRUNED_INDICES, MaskEncoding.ACTIVE_INDICES, MaskEncoding.BITMAP]

SETTINGS = settings(max_examples=30, deadline=None)
FEW = settings(max_examples=15, deadline=None)

shapes = st.lists(st.integers(1, 64), min_size=1, max_size=3).map(tuple)
sparsities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------


def formula_bytes(numel: int, n_pruned: int) -> dict[MaskEncoding, int]:
    return {
        MaskEncoding.PRUNED_INDICES: 4 * n_pruned,
        MaskEncoding.ACTIVE_INDICES: 4 * (numel - n_pruned),
        MaskEncoding.BITMAP: math.ceil(numel / 8),
    }


def expected_encoding(numel: int, n_pruned: int) -> MaskEncoding:
    sizes = formula_bytes(numel, n_pruned)
    smallest = min(sizes.values())
    return next(e for e in PREFERENCE if sizes[e] == smallest)


def random_pruned(shape, sparsity: float, seed: int) -> torch.Tensor:
    """Bool tensor of ``shape`` with exactly round(sparsity * n) True entries."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[: round(sparsity * n)]] = True
    return flat.reshape(shape)


def random_values(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(n, generator=g) + 2.0).to(dtype)


def reference_bitmap(flat_pruned: torch.Tensor) -> torch.Tensor:
    packed = np.packbits(flat_pruned.numpy().astype(np.uint8), bitorder="little")
    return torch.from_numpy(packed.copy())


# --------------------------------------------------------------------------
# encoding choice
# --------------------------------------------------------------------------


@SETTINGS
@given(numel=st.integers(0, 10**7), frac=st.floats(0.0, 1.0))
def test_choose_encoding_is_smallest_with_tie_preference(numel, frac):
    n_pruned = round(frac * numel)
    enc = choose_encoding(numel, n_pruned)
    sizes = formula_bytes(numel, n_pruned)
    assert sizes[enc] == min(sizes.values())
    assert enc == expected_encoding(numel, n_pruned)


def test_choose_encoding_ties():
    # 4p == ceil(n/8) == 4(n-p) is impossible, but pairwise ties are not
    n = 64  # bitmap = 8 bytes
    assert choose_encoding(n, 2) == MaskEncoding.PRUNED_INDICES  # 8 == 8
    assert choose_encoding(n, n - 2) == MaskEncoding.ACTIVE_INDICES  # 8 == 8
    assert choose_encoding(8, 4) == MaskEncoding.BITMAP  # 16, 16, 1
    assert choose_encoding(0, 0) == MaskEncoding.PRUNED_INDICES


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_encode_pruned_picks_smallest(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed)
    n, p = pruned.numel(), int(pruned.sum())
    storage, enc = encode_pruned(pruned)
    assert enc == expected_encoding(n, p)
    nbytes = storage.numel() * storage.element_size()
    assert nbytes == min(formula_bytes(n, p).values())
    assert nbytes <= n / 8 + 1
    assert torch.equal(pruned_bool(storage, enc, n, p), pruned.reshape(-1))


# --------------------------------------------------------------------------
# round trips and kernels, every encoding
# --------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_every_encoding_round_trips(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed)
    flat = pruned.reshape(-1)
    n, p = flat.numel(), int(flat.sum())
    for enc in ENCODINGS:
        storage = _encode_as(pruned, enc)
        assert storage.dim() == 1
        if enc is MaskEncoding.PRUNED_INDICES:
            assert storage.dtype == torch.int32
            assert torch.equal(storage.long(), torch.nonzero(flat).flatten())
        elif enc is MaskEncoding.ACTIVE_INDICES:
            assert storage.dtype == torch.int32
            assert torch.equal(storage.long(), torch.nonzero(~flat).flatten())
        else:
            assert storage.dtype == torch.uint8
            assert torch.equal(storage, reference_bitmap(flat))
        assert storage.numel() * storage.element_size() == formula_bytes(n, p)[enc]
        assert torch.equal(pruned_bool(storage, enc, n, p), flat)
        m = SparseMask.from_storage(storage, enc, shape, p, validate=True)
        assert m.encoding is enc
        assert m.storage is storage
        assert torch.equal(m.mask, ~pruned)
        assert m == SparseMask.from_dense_mask(~pruned)


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_kernels_match_dense_reference(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed).reshape(-1)
    active = ~pruned
    n, p = pruned.numel(), int(pruned.sum())
    values = random_values(n, seed)
    new_pruned = -random_values(p, seed + 7)
    new_active = -random_values(n - p, seed + 11)
    exp_sp = values.clone()
    exp_sp[pruned] = new_pruned
    exp_sa = values.clone()
    exp_sa[active] = new_active
    for enc in ENCODINGS:
        args = (_encode_as(pruned, enc), enc, n, p)
        pidx = pruned_flat_indices(*args)
        aidx = active_flat_indices(*args)
        assert pidx.dtype == torch.int64 and aidx.dtype == torch.int64
        assert torch.equal(pidx, torch.nonzero(pruned).flatten())
        assert torch.equal(aidx, torch.nonzero(active).flatten())
        assert torch.equal(pruned_bool(*args), pruned)
        gp = gather_pruned(values, *args)
        ga = gather_active(values, *args)
        assert gp.dtype == values.dtype and ga.dtype == values.dtype
        assert torch.equal(gp, values[pruned])
        assert torch.equal(ga, values[active])
        before = values.clone()
        assert torch.equal(scatter_pruned(values, new_pruned, *args), exp_sp)
        assert torch.equal(scatter_active(values, new_active, *args), exp_sa)
        assert torch.equal(zero_pruned(values, *args), values.masked_fill(pruned, 0))
        assert torch.equal(values, before)  # out of place
        # the encoding may also be given by its string value
        assert torch.equal(gather_pruned(values, args[0], enc.value, n, p), values[pruned])


@FEW
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_kernels_keep_dtype_and_gradients(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed).reshape(-1)
    n, p = pruned.numel(), int(pruned.sum())
    for enc in ENCODINGS:
        args = (_encode_as(pruned, enc), enc, n, p)
        half = random_values(n, seed, torch.bfloat16)
        assert gather_pruned(half, *args).dtype == torch.bfloat16
        assert scatter_active(half, gather_active(half, *args), *args).dtype == torch.bfloat16

        values = random_values(n, seed).requires_grad_()
        theta = random_values(p, seed + 3).requires_grad_()
        w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        (scatter_pruned(values, theta, *args) * w).sum().backward()
        assert torch.equal(theta.grad, w[pruned])
        assert torch.equal(values.grad, w.masked_fill(pruned, 0))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2)])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_empty_shapes(shape, enc):
    pruned = torch.zeros(shape, dtype=torch.bool)
    storage = _encode_as(pruned, enc)
    args = (storage, enc, 0, 0)
    values = torch.empty(0)
    assert pruned_bool(*args).shape == (0,)
    assert pruned_flat_indices(*args).shape == (0,)
    assert active_flat_indices(*args).shape == (0,)
    assert gather_pruned(values, *args).shape == (0,)
    assert scatter_active(values, values, *args).shape == (0,)
    m = SparseMask.from_storage(storage, enc, shape, 0)
    assert m.sparsity == 0.0 and m.numel == 0 and m.mask.shape == shape
    r = SparseMask.random(shape, 0.5)
    assert r.n_pruned == 0 and r.sparsity == 0.0
    assert SparseMask.from_magnitude(torch.empty(shape), 0.5, global_pruning=False).n_pruned == 0
    assert SparseMask(torch.empty(0, dtype=torch.long), shape).nbytes == 0



def test_bad_kernel_arguments():
    pruned = random_pruned((5, 7), 0.3, 1).reshape(-1)
    n, p = 35, int(pruned.sum())
    for enc in ENCODINGS:
        storage = _encode_as(pruned, enc)
        with pytest.raises(ValueError, match="storage"):
            pruned_bool(storage[:-1], enc, n, p)
        with pytest.raises(ValueError, match="storage"):
            gather_pruned(torch.randn(n), storage.to(torch.float32), enc, n, p)
        with pytest.raises(ValueError, match="flat_values"):
            gather_active(torch.randn(n + 1), storage, enc, n, p)
        with pytest.raises(ValueError, match="compact"):
            scatter_pruned(torch.randn(n), torch.randn(p + 1), storage, enc, n, p)
        with pytest.raises(ValueError, match="storage"):
            SparseMask.from_storage(storage[:-1], enc, (5, 7), p)


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("enc", ENCODINGS)
def test_kernels_under_compile_fullgraph(enc):
    """Inductor compiles every kernel (forward); AOTAutograd traces the backward too."""
    torch._dynamo.reset()
    shape = (5, 7)
    pruned = random_pruned(shape, 0.4, 17).reshape(-1)
    n, p = pruned.numel(), int(pruned.sum())
    storage = _encode_as(pruned, enc)

    def run(values, theta, active_vals, storage):
        args = (storage, enc, n, p)
        return (
            pruned_bool(*args),
            pruned_flat_indices(*args),
            active_flat_indices(*args),
            gather_pruned(values, *args),
            gather_active(values, *args),
            scatter_pruned(values, theta, *args),
            scatter_active(values, active_vals, *args),
            zero_pruned(values, *args),
        )

    values = random_values(n, 1)
    theta = random_values(p, 2)
    active_vals = random_values(n - p, 3)
    out = torch.compile(run, fullgraph=True)(values, theta, active_vals, storage)
    ref = run(values, theta, active_vals, storage)
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(out[0], pruned)
    assert torch.equal(out[3], values[pruned])

    values.requires_grad_()
    theta.requires_grad_()
    traced = torch.compile(run, fullgraph=True, backend="aot_eager")
    out = traced(values, theta, active_vals, storage)
    weight = torch.arange(n, dtype=torch.float32)
    (out[5] * weight).sum().backward()
    assert torch.equal(theta.grad, weight[pruned])
    assert torch.equal(values.grad, weight.masked_fill(pruned, 0))
