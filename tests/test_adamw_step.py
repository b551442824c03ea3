"""adamw_step_: every (target × selection) goes to the kernel its dispatch picks, and matches the reference.

The Triton kernels run on CPU under ``TRITON_INTERPRET=1`` (set by conftest) with the one kernel choice,
``resu.compile.registry.use_triton``, forced on; every case is checked against ``adamw_reference_`` on
fresh random inputs, including the slots and states that must stay bitwise untouched.
"""

import pytest
import torch

from resu.compile import registry
from resu.optim import adamw_step as A
from resu.tensors import mask as mask_ops

pytest.importorskip("triton")

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
TOL = dict(rtol=1e-5, atol=1e-6)
SHAPE = (37, 61)


def _masked(encoding, pruned_slots: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    numel = SHAPE[0] * SHAPE[1]
    # sparsities at which each encoding is the one chosen, so the storage is realistic
    sparsity = {"pruned_indices": 0.02, "active_indices": 0.98, "bitmap": 0.5}[encoding.value]
    k = int(round(sparsity * numel))
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=g)[:k]] = True
    storage = mask_ops._encode_as(pruned.view(SHAPE), encoding)
    weight = torch.randn(SHAPE, generator=g)
    return A.MaskedSlots(weight, storage, encoding, k, pruned_slots)


def _target(kind, encoding, seed):
    if kind == "compact":
        return torch.randn(500, generator=torch.Generator().manual_seed(seed))
    return _masked(encoding, kind == "pruned", seed)


def _n_slots(target):
    if isinstance(target, A.MaskedSlots):
        return target.n_pruned if target.pruned else target.weight.numel() - target.n_pruned
    return target.numel()


def _selection(kind, n, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "all":
        return A.ALL, n
    if kind == "mask":
        return A.where(torch.rand(n, generator=g) < 0.4), n
    if kind == "key":
        keys = torch.randint(-1, 1000, (n,), generator=g, dtype=torch.int64)
        return A.key_at_least(keys, torch.tensor(600, dtype=torch.int64)), n
    k = max(1, n // 3)
    return A.subset(torch.randperm(n, generator=g)[:k].sort().values), k


def _clone(target):
    if isinstance(target, A.MaskedSlots):
        return A.MaskedSlots(target.weight.clone(), target.storage, target.encoding, target.n_pruned, target.pruned)
    return target.clone()


# A compact target has no mask: one entry covers it.
TARGETS = [("compact", mask_ops.MaskEncoding.BITMAP)] + [
    (kind, enc) for kind in ("pruned", "active") for enc in mask_ops.MaskEncoding
]


@pytest.mark.parametrize("target_kind, encoding", TARGETS, ids=lambda x: getattr(x, "value", x))
@pytest.mark.parametrize("selection_kind", ["all", "mask", "key", "index"])
@pytest.mark.parametrize("maximize", [False, True])
def test_dispatched_kernel_matches_the_reference(monkeypatch, target_kind, encoding, selection_kind, maximize):
    seed = hash((target_kind, encoding.value, selection_kind)) % 10_000
    target = _target(target_kind, encoding, seed)
    n = _n_slots(target)
    selection, n_states = _selection(selection_kind, n, seed)
    g = torch.Generator().manual_seed(seed + 2)
    grad = torch.randn(n, generator=g)
    m, v = torch.randn(n_states, generator=g), torch.rand(n_states, generator=g)
    hyper = {**HYPER, "maximize": maximize}

    ref_target, ref_m, ref_v = _clone(target), m.clone(), v.clone()
    A.adamw_reference_(ref_target, grad, ref_m, ref_v, 3, selection=selection, **hyper)
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    got_target, got_m, got_v = _clone(target), m.clone(), v.clone()
    A.adamw_step_(got_target, grad, got_m, got_v, 3, selection=selection, **hyper)

    before, ref, got = (A.holder(t).reshape(-1) for t in (target, ref_target, got_target))
    assert not torch.equal(ref, before)  # the step moved something
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got_m, ref_m, **TOL)
    torch.testing.assert_close(got_v, ref_v, **TOL)
    # what the reference left bitwise untouched, the kernel left bitwise untouched too
    untouched = ref == before
    assert torch.equal(got[untouched], before[untouched])


def test_amsgrad_and_plain_compact_steps_take_the_reference_bitwise(monkeypatch):
    """AMSGrad is reference-only, even where a kernel exists."""
    theta = torch.randn(300)
    grad, m, v, vmax = torch.randn(300), torch.zeros(300), torch.zeros(300), torch.zeros(300)
    ref = [t.clone() for t in (theta, m, v, vmax)]
    A.adamw_reference_(ref[0], grad, ref[1], ref[2], 1, max_exp_avg_sq=ref[3], **HYPER, maximize=False)
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    A.adamw_step_(theta, grad, m, v, 1, max_exp_avg_sq=vmax, **HYPER, maximize=False)
    for a, b in zip((theta, m, v, vmax), ref):
        assert torch.equal(a, b)


def test_dense_gradient_of_masked_slots_is_read_at_the_slots():
    target = _masked(mask_ops.MaskEncoding.BITMAP, False, seed=4)
    n = _n_slots(target)
    dense = torch.randn(SHAPE)
    compact = dense.reshape(-1)[target.flat_indices()]
    a, b = _clone(target), _clone(target)
    A.adamw_step_(a, dense, torch.zeros(n), torch.zeros(n), 1, **HYPER, maximize=False)
    A.adamw_step_(b, compact, torch.zeros(n), torch.zeros(n), 1, **HYPER, maximize=False)
    assert torch.equal(a.weight, b.weight)
