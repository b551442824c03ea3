"""Tests of ``SparseMask`` (resu/tensors/mask.py), the mask-level API over the encodings.

Every expected value is computed independently from a dense boolean
reference (boolean indexing, ``nonzero``, numpy) rather than written out.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from resu.tensors.mask import (
    MaskEncoding,
    MaskStats,
    SparseMask,
    _encode_as,
    choose_encoding,
    encode_pruned,
)
from tests.test_mask_kernels import (
    ENCODINGS,
    SETTINGS,
    expected_encoding,
    formula_bytes,
    random_pruned,
    random_values,
    seeds,
    shapes,
    sparsities,
)

# --------------------------------------------------------------------------
# SparseMask
# --------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_sparse_mask_from_indices(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed)
    flat = pruned.reshape(-1)
    n, p = flat.numel(), int(flat.sum())
    order = torch.randperm(p, generator=torch.Generator().manual_seed(seed))
    indices = torch.nonzero(flat).flatten()[order]  # any order is accepted
    m = SparseMask(indices, shape)
    assert m.shape == shape and m.numel == n
    assert m.n_pruned == p and m.n_active == n - p
    assert m.sparsity == p / n
    assert m.stats == MaskStats(total=n, n_active=n - p, n_pruned=p, sparsity=p / n)
    assert m.encoding == expected_encoding(n, p)
    assert m.nbytes == min(formula_bytes(n, p).values())
    assert m.nbytes <= n / 8 + 1
    assert m.device == torch.device("cpu")
    assert torch.equal(m.pruned_indices, torch.nonzero(flat).flatten())
    assert torch.equal(m.active_indices, torch.nonzero(~flat).flatten())
    assert m.mask.dtype == torch.bool and torch.equal(m.mask, ~pruned)
    fixed = SparseMask(indices.to(torch.int32), shape, adaptive=False)
    assert fixed.encoding is MaskEncoding.PRUNED_INDICES
    assert fixed.nbytes == 4 * p
    assert fixed == m
    assert SparseMask(indices.tolist(), list(shape), device="cpu") == m
    assert repr(m).startswith("SparseMask(") and m.encoding.value in repr(m)


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_apply_and_gather(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed)
    m = SparseMask.from_dense_mask((~pruned).to(torch.float32))  # 0/1 mask, 1 = active
    assert torch.equal(m.mask, ~pruned)
    t = random_values(pruned.numel(), seed).reshape(shape)
    t[pruned] = float("inf")  # pruned slots become exactly 0, whatever they hold
    before = t.clone()
    expected = torch.where(pruned, torch.zeros(()), t)
    assert torch.equal(m.apply(t), expected)
    assert torch.equal(t, before)
    assert torch.equal(m.get_active(t), t[~pruned])
    assert torch.equal(m.get_pruned(t), t[pruned])
    assert m.apply_inplace(t) is t
    assert torch.equal(t, expected)
    # non-contiguous input
    tt = before.clone().transpose(0, -1) if len(shape) > 1 else before.clone()
    mt = SparseMask.from_dense_mask(~pruned.transpose(0, -1) if len(shape) > 1 else ~pruned)
    mt.apply_inplace(tt)
    ref = before.transpose(0, -1) if len(shape) > 1 else before
    assert torch.equal(tt, torch.where(~mt.mask, torch.zeros(()), ref))


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds, ties=st.booleans())
def test_from_magnitude_global_prunes_smallest(shape, sparsity, seed, ties):
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    if ties:
        w = torch.randint(-3, 4, shape, generator=g).to(torch.float32)
    else:
        w = torch.randn(shape, generator=g)
    m = SparseMask.from_magnitude(w, sparsity)
    k = round(sparsity * n)
    assert m.n_pruned == k and m.shape == shape
    mag = w.abs().reshape(-1)
    pruned = ~m.mask.reshape(-1)
    if 0 < k < n:
        assert mag[pruned].max() <= mag[~pruned].min()
    order = np.argsort(mag.numpy(), kind="stable")[:k]
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.from_numpy(order.copy())] = True
    assert torch.equal(pruned, expected)
    assert SparseMask.from_magnitude(w, sparsity) == m  # deterministic


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds, ties=st.booleans())
def test_from_magnitude_per_row(shape, sparsity, seed, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:
        w = torch.randint(-3, 4, shape, generator=g).to(torch.float32)
    else:
        w = torch.randn(shape, generator=g)
    m = SparseMask.from_magnitude(w, sparsity, global_pruning=False)
    cols = shape[-1]
    k = round(sparsity * cols)
    mag = w.abs().reshape(-1, cols)
    pruned = ~m.mask.reshape(-1, cols)
    assert torch.equal(pruned.sum(dim=1), torch.full((mag.shape[0],), k))
    order = np.argsort(mag.numpy(), axis=1, kind="stable")[:, :k]
    expected = torch.zeros_like(pruned)
    for r in range(mag.shape[0]):
        expected[r, torch.from_numpy(order[r].copy())] = True
    assert torch.equal(pruned, expected)


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_random_exact_count_and_reproducible(shape, sparsity, seed):
    n = math.prod(shape)
    a = SparseMask.random(shape, sparsity, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    b = SparseMask.random(shape, sparsity, device="cpu", generator=g)
    assert a.n_pruned == round(sparsity * n) == int((~a.mask).sum())
    assert a == b
    assert a.encoding == expected_encoding(n, a.n_pruned)


@SETTINGS
@given(shape=shapes, s1=sparsities, s2=sparsities, seed=seeds)
def test_update(shape, s1, s2, seed):
    first = random_pruned(shape, s1, seed)
    second = random_pruned(shape, s2, seed + 1)
    m = SparseMask.from_dense_mask(~first)
    copy = m.update(~second, inplace=False)
    assert torch.equal(m.mask, ~first)
    assert torch.equal(copy.mask, ~second)
    assert copy.encoding == expected_encoding(first.numel(), int(second.sum()))
    assert m.update((~second).to(torch.int64)) is m
    assert m == copy and torch.equal(m.mask, ~second)
    assert m.n_pruned == int(second.sum())
    fixed = SparseMask(torch.nonzero(first.reshape(-1)).flatten(), shape, adaptive=False)
    fixed.update(~second)
    assert fixed.encoding is MaskEncoding.PRUNED_INDICES and fixed == m


@SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds)
def test_state_dict_round_trip_every_encoding(shape, sparsity, seed):
    pruned = random_pruned(shape, sparsity, seed)
    p = int(pruned.sum())
    for enc in ENCODINGS:
        m = SparseMask.from_storage(_encode_as(pruned, enc), enc, shape, p)
        sd = m.state_dict()
        assert set(sd) == {"shape", "n_pruned", "encoding", "storage"}
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        back = SparseMask.from_state_dict(loaded)
        assert back == m and back.encoding is enc and back.shape == shape
        assert torch.equal(back.storage, m.storage)
        assert torch.equal(back.mask, ~pruned)
        moved = m.to("cpu")
        assert moved == m and moved is not m


def test_equality_across_encodings_and_shapes():
    pruned = random_pruned((6, 10), 0.5, 3)
    p = int(pruned.sum())
    masks = [SparseMask.from_storage(_encode_as(pruned, e), e, (6, 10), p) for e in ENCODINGS]
    assert masks[0] == masks[1] == masks[2]
    reshaped = SparseMask.from_storage(_encode_as(pruned, "bitmap"), "bitmap", (10, 6), p)
    assert masks[0] != reshaped
    other = pruned.clone()
    other[0, 0] = ~other[0, 0]
    assert masks[1] != SparseMask.from_dense_mask(~other)
    assert masks[0] != "not a mask"


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.5"])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        SparseMask.random((4, 4), bad)
    with pytest.raises(ValueError, match="sparsity"):
        SparseMask.from_magnitude(torch.randn(4, 4), bad)
    with pytest.raises(ValueError, match="sparsity"):
        SparseMask.from_magnitude(torch.randn(4, 4), bad, global_pruning=False)


@pytest.mark.parametrize(
    "indices",
    [
        torch.tensor([0, 12]),  # out of range for 12 elements
        torch.tensor([-1, 3]),
        torch.tensor([2, 5, 2]),  # duplicate
        torch.tensor([1.0, 2.0]),  # not integer
        torch.tensor([True, False]),
        torch.tensor([[1, 2]]),  # not 1-D
    ],
)
def test_bad_pruned_indices(indices):
    with pytest.raises(ValueError, match="pruned_indices"):
        SparseMask(indices, (3, 4))


@pytest.mark.parametrize("shape", [(2**16, 2**15), (2**31,), (3, -1), (2.5,), "ab"])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        SparseMask(torch.tensor([0]), shape)
    with pytest.raises(ValueError, match="shape"):
        SparseMask.random(shape, 0.5)


def test_bad_other_arguments():
    m = SparseMask.random((3, 4), 0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shape"):
        m.apply(torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        m.apply_inplace(torch.randn(12))
    with pytest.raises(ValueError, match="shape"):
        m.get_pruned(torch.randn(3, 5))
    with pytest.raises(ValueError, match="new_dense_mask"):
        m.update(torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="new_dense_mask"):
        m.update(torch.full((3, 4), 2.0))
    with pytest.raises(ValueError, match="mask"):
        SparseMask.from_dense_mask(torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="pruned"):
        encode_pruned(torch.randn(3, 4))
    with pytest.raises(ValueError, match="numel"):
        choose_encoding(-1, 0)
    with pytest.raises(ValueError, match="numel"):
        choose_encoding(2**31, 0)
    with pytest.raises(ValueError, match="n_pruned"):
        choose_encoding(10, 11)
    with pytest.raises(ValueError, match="encoding"):
        SparseMask.from_storage(m.storage, "dense", (3, 4), m.n_pruned)
    with pytest.raises(ValueError, match="n_pruned"):
        SparseMask.from_storage(m.storage, m.encoding, (3, 4), 13)


@pytest.mark.parametrize("key", ["shape", "n_pruned", "encoding", "storage"])
def test_state_dict_missing_key(key):
    sd = SparseMask.random((5, 7), 0.5, generator=torch.Generator().manual_seed(0)).state_dict()
    del sd[key]
    with pytest.raises(ValueError, match=key):
        SparseMask.from_state_dict(sd)


def test_state_dict_corrupt_storage():
    shape, n = (5, 7), 35
    pruned = random_pruned(shape, 0.2, 5)
    p = int(pruned.sum())
    idx = _encode_as(pruned, "pruned_indices")
    padding_bit = torch.tensor([0, 0, 0, 0, 128], dtype=torch.uint8)  # flat index 39 >= 35
    corrupt = [
        ("pruned_indices", idx.flip(0)),  # not ascending
        ("pruned_indices", torch.cat([idx[:-1], torch.tensor([n], dtype=torch.int32)])),
        ("active_indices", _encode_as(pruned, "active_indices").flip(0)),
        ("bitmap", torch.zeros(math.ceil(n / 8), dtype=torch.uint8)),  # wrong bit count
        ("bitmap", _encode_as(pruned, "bitmap") | padding_bit),  # padding bit set
    ]
    for enc, storage in corrupt:
        sd = {"shape": shape, "n_pruned": p, "encoding": enc, "storage": storage}
        with pytest.raises(ValueError, match="storage"):
            SparseMask.from_state_dict(sd)
