"""The Triton launchers refuse lengths that do not match the mask, before launching.

Run on CPU under ``TRITON_INTERPRET=1`` (set by conftest) and on a GPU as they are. Each launcher is
called once with valid buffers (it runs and writes) and once with a buffer one element too short or
too long (it raises a ValueError naming the argument, and no buffer is written).
"""

from __future__ import annotations

import pytest
import torch

from resu.tensors import mask_kernels as mask_ops

triton_adamw = pytest.importorskip("resu.compile.triton_adamw")
from resu.compile import triton_bitmap, triton_qresu, triton_selective  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, maximize=False)
SHAPE = (9, 14)


def _bitmap(seed=0):
    g = torch.Generator().manual_seed(seed)
    pruned = torch.rand(SHAPE, generator=g) < 0.4
    storage = mask_ops._encode_as(pruned, mask_ops.MaskEncoding.BITMAP).to(DEVICE)
    return pruned.to(DEVICE), storage, int(pruned.sum())


def _untouched(*tensors):
    return [t.clone() for t in tensors]


def _assert_untouched(saved, tensors):
    assert all(torch.equal(a, b) for a, b in zip(saved, tensors))


@pytest.mark.parametrize("delta", [-1, 1])
def test_bitmap_adamw_refuses_states_of_the_wrong_length(delta):
    pruned, storage, n = _bitmap()
    w = torch.randn(SHAPE, device=DEVICE)
    grad = torch.randn(n, device=DEVICE)
    m, v = torch.zeros(n + delta, device=DEVICE), torch.zeros(n + delta, device=DEVICE)
    saved = _untouched(w, m, v)
    with pytest.raises(ValueError, match="exp_avg"):
        triton_adamw.bitmap_adamw_triton_(w, grad, m, v, storage, True, 1, **HYPER, n_selected=n)
    _assert_untouched(saved, (w, m, v))
    m, v = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    triton_adamw.bitmap_adamw_triton_(w, grad, m, v, storage, True, 1, **HYPER, n_selected=n)
    assert not torch.equal(w[pruned], saved[0][pruned]) and torch.equal(w[~pruned], saved[0][~pruned])


def test_bitmap_adamw_with_keys_refuses_keys_of_the_wrong_length():
    _, storage, n = _bitmap()
    w = torch.randn(SHAPE, device=DEVICE)
    grad, m, v = torch.randn(n, device=DEVICE), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    keys = torch.arange(n - 1, device=DEVICE)
    saved = _untouched(w, m, v)
    with pytest.raises(ValueError, match="keys"):
        triton_adamw.bitmap_adamw_triton_(w, grad, m, v, storage, True, 1, **HYPER, n_selected=n, keys=keys,
                                          threshold=torch.tensor(0, device=DEVICE))
    _assert_untouched(saved, (w, m, v))


def test_gather_bitmap_refuses_storage_of_the_wrong_length():
    _, storage, n = _bitmap()
    src = torch.randn(SHAPE, device=DEVICE)
    with pytest.raises(ValueError, match="storage"):
        triton_bitmap.gather_bitmap(src, storage[:-1].clone(), n, True, torch.float32)
    with pytest.raises(ValueError, match="n_selected"):
        triton_bitmap.gather_bitmap(src, storage, src.numel() + 1, True, torch.float32)


def test_compact_and_indexed_adamw_refuse_mismatched_lengths():
    theta = torch.randn(20, device=DEVICE)
    saved = _untouched(theta)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        triton_adamw.compact_adamw_triton_(theta, torch.randn(20, device=DEVICE), torch.zeros(20, device=DEVICE),
                                           torch.zeros(19, device=DEVICE), 1, **HYPER)
    with pytest.raises(ValueError, match="grad_index"):
        triton_adamw.indexed_adamw_triton_(theta, torch.arange(5, device=DEVICE), torch.randn(20, device=DEVICE),
                                           torch.arange(4, device=DEVICE), torch.zeros(5, device=DEVICE),
                                           torch.zeros(5, device=DEVICE), 1, **HYPER)
    _assert_untouched(saved, (theta,))


def test_dequant_merge_refuses_theta_one_short():
    import resu
    import torch.nn as nn

    torch.manual_seed(0)
    model = resu.sparsify_(nn.Sequential(nn.Linear(SHAPE[1], SHAPE[0])))
    resu.prune_(model, 0.5)
    resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4)
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in model[0].weight._quant_op_args()]
    out = triton_qresu.dequant_merge_triton(*args, torch.float32)
    assert out.shape == SHAPE
    args[3] = args[3][:-1].clone()  # θ
    with pytest.raises(ValueError, match="theta"):
        triton_qresu.dequant_merge_triton(*args, torch.float32)


def test_consistency_pass_refuses_emas_of_the_wrong_length():
    grad = torch.randn(30, device=DEVICE)
    keys = torch.zeros(30, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="ema_v"):
        triton_selective.consistency_pass_triton_(
            grad, torch.zeros(30, device=DEVICE), torch.zeros(29, device=DEVICE), keys,
            torch.tensor(0, device=DEVICE), beta=0.9, delta=1e-8, tau=0.5, maximize=False,
        )


def test_grouped_fast_check_accepts_only_what_the_full_check_accepts(monkeypatch):
    """The grouped launcher's one-expression check of the common case never accepts an item that the
    full checks refuse, and accepts the valid ones (else every step would take the slow path)."""
    from resu.compile import launch_checks as lc

    _, storage, k = _bitmap(3)
    numel = SHAPE[0] * SHAPE[1]
    dev = storage.device
    f = dict(device=DEVICE)

    def valid(kind):
        n = {0: 50, 1: k, 2: numel - k}[kind & 3]
        holder = torch.zeros(50 if kind & 3 == 0 else numel, **f)
        grad = torch.zeros(numel if kind & 4 else n, **f)
        return [kind, holder, grad, torch.zeros(n, **f), torch.zeros(n, **f), 1, None if kind == 0 else storage, n]

    def variants(item):
        kind, holder, grad, m, v, step, st, n = item
        yield "n past numel", [kind, holder, grad, m, v, step, st, holder.numel() + 1]
        yield "n negative", [kind, holder, grad, m, v, step, st, -1]
        yield "kind 3", [3, holder, grad, m, v, step, st, n]
        yield "short exp_avg", [kind, holder, grad, m[:-1], v, step, st, n]
        yield "long exp_avg_sq", [kind, holder, grad, m, torch.zeros(n + 1, **f), step, st, n]
        yield "short grad", [kind, holder, grad[:-1], m, v, step, st, n]
        yield "bf16 grad", [kind, holder, grad.bfloat16(), m, v, step, st, n]
        yield "not a tensor", [kind, holder, grad.tolist(), m, v, step, st, n]
        yield "bool count", [kind, holder, grad, m, v, step, st, True]
        for i, name in ((1, "holder"), (2, "grad"), (3, "exp_avg"), (4, "exp_avg_sq")):
            t = item[i]
            strided = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)[::2]
            yield f"strided {name}", item[:i] + [strided] + item[i + 1:]
            yield f"fp64 {name}", item[:i] + [t.double()] + item[i + 1:]
            yield f"meta {name}", item[:i] + [torch.zeros(t.numel(), device="meta")] + item[i + 1:]
        if kind & 3:
            yield "short storage", [kind, holder, grad, m, v, step, st[:-1], n]
            yield "int8 storage", [kind, holder, grad, m, v, step, st.view(torch.int8), n]
            yield "no storage", [kind, holder, grad, m, v, step, None, n]
            yield "strided storage", [kind, holder, grad, m, v, step, torch.zeros(2 * st.numel(), dtype=torch.uint8,
                                                                             device=st.device)[::2], n]
            yield "meta storage", [kind, holder, grad, m, v, step, torch.zeros(st.numel(), dtype=torch.uint8,
                                                                         device="meta"), n]

    kinds = (0, 1, 2, 5, 6)
    for kind in kinds:
        item = valid(kind)
        assert lc._grouped_item_accepts(item, dev), kind
        lc._check_grouped_item("grouped_adamw", 0, item, dev)
        for what, bad in variants(item):
            with pytest.raises(ValueError):  # every variant is invalid: the full check names it
                lc._check_grouped_item("grouped_adamw", 0, bad, dev)
            assert not lc._grouped_item_accepts(bad, dev), (kind, what)
    one = [0, torch.zeros(1, **f), torch.zeros(1, **f), torch.zeros(1, **f), torch.zeros(1, **f), 1, None, 1]
    assert lc._grouped_item_accepts(one, dev)
    one[7] = True  # a bool is not a count
    with pytest.raises(ValueError):
        lc._check_grouped_item("grouped_adamw", 0, one, dev)
    assert not lc._grouped_item_accepts(one, dev)
    # past the kernel's int32 offsets (the limit lowered here: a tensor of 2^31 slots does not fit a test)
    monkeypatch.setattr(lc, "MAX_NUMEL", 40)
    for kind in kinds:
        item = valid(kind)
        with pytest.raises(ValueError, match="at most 40 elements"):
            lc._check_grouped_item("grouped_adamw", 0, item, dev)
        assert not lc._grouped_item_accepts(item, dev)
