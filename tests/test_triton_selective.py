"""Triton kernels of the θ steps against their PyTorch references, on fresh random inputs.

On CPU they run under ``TRITON_INTERPRET=1`` (set by conftest); ``pytest -m cuda`` runs the CUDA cases.
"""

import pytest
import torch

from resu.optim.adamw_step import ALL, MaskedSlots, adamw_reference_, subset, where
from resu.optim.consistency import (
    consistency_pass_reference_,
    kth_largest,
    selection_keys_reference,
)
from resu.tensors import mask as mask_ops

ts = pytest.importorskip("resu.compile.triton_selective")
ta = pytest.importorskip("resu.compile.triton_adamw")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# Triton may contract a*b + c into an FMA on a GPU; the interpreter does not.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 777, 2048, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_match_reference_and_order_by_magnitude_then_index(device, n, dtype):
    g = torch.randn(n, device=device).to(dtype)
    g[: n // 3] = g[n // 3 : 2 * (n // 3)] * -1  # equal magnitudes: ties resolved by index
    if n > 4:
        g[0], g[1] = 0.0, -0.0
    keys = ts.selection_keys_triton(g)
    assert torch.equal(keys, selection_keys_reference(g))
    order = sorted(range(n), key=lambda i: (-abs(float(g[i])), i))
    assert keys.argsort(descending=True).tolist() == order
    assert len(set(keys.tolist())) == n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [5, 1500, 4100])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_consistency_pass_matches_reference(device, n, maximize, state_dtype):
    g = torch.randn(n, device=device)
    m = (torch.randn(n, device=device) * 0.1).to(state_dtype)
    v = (m.float().abs() + torch.rand(n, device=device) * 0.2).to(state_dtype)
    keys = selection_keys_reference(g)
    screen = kth_largest(keys, max(1, n // 2))
    cfg = dict(beta=0.8, delta=1e-8, tau=0.4, maximize=maximize)
    ref = [t.clone() for t in (m, v, keys)]
    sum_ref, count_ref = consistency_pass_reference_(g, *ref, screen, **cfg)
    got = [t.clone() for t in (m, v, keys)]
    sum_c, count = ts.consistency_pass_triton_(g, *got, screen, **cfg)
    # bf16 states: fp32 → bf16 rounding may differ by one bf16 ulp between Triton and PyTorch.
    tol, margin = (TOL, 1e-4) if state_dtype == torch.float32 else (dict(rtol=1.6e-2, atol=1e-5), 5e-2)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    c = ref[0].float().abs() / (ref[1].float() + 1e-8)
    clear = (c - 0.4).abs() > margin  # away from the threshold, decisions must agree exactly
    assert torch.equal(got[2][clear], ref[2][clear])
    assert (got[2] >= 0).sum() == count and (ref[2] >= 0).sum() == count_ref
    assert (count - count_ref).abs() <= (~clear).sum()
    torch.testing.assert_close(sum_c, sum_ref.float(), rtol=1e-4 if state_dtype == torch.float32 else 2e-2, atol=1e-4)
    assert count_ref > 0 and count_ref < n or n < 10


@pytest.mark.parametrize("device", DEVICES)
def test_consistency_pass_reads_the_keys_it_is_given(device):
    """A row shard's keys carry the slot's index in the whole weight (its shard offset subtracted): the
    pass must keep exactly those keys, as the reference does, not keys rebuilt from the local index."""
    n, offset = 1500, 10_000
    g = torch.full((n,), 0.5, device=device)  # every magnitude tied: the index alone orders the keys
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    keys = selection_keys_reference(g) - offset
    screen = keys[n // 3].clone()  # a threshold only the shifted keys place correctly
    cfg = dict(beta=0.9, delta=1e-8, tau=0.3, maximize=False)
    ref = [t.clone() for t in (m, v, keys)]
    _, count_ref = consistency_pass_reference_(g, *ref, screen, **cfg)
    got = [t.clone() for t in (m, v, keys)]
    _, count = ts.consistency_pass_triton_(g, *got, screen, **cfg)
    assert int(count_ref) == n // 3 + 1
    assert torch.equal(got[2], ref[2]) and int(count) == int(count_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["all", "mask", "key"])
@pytest.mark.parametrize("maximize", [False, True])
def test_compact_adamw_kernel_matches_reference(device, mode, maximize):
    n = 3001
    theta, grad = torch.randn(n, device=device), torch.randn(n, device=device)
    m, v = torch.randn(n, device=device), torch.rand(n, device=device)
    hyper = {**HYPER, "maximize": maximize}
    keys = torch.randint(-1, 1000, (n,), dtype=torch.int64, device=device)
    threshold = torch.tensor(400, dtype=torch.int64, device=device)
    mask = torch.rand(n, device=device) < 0.3
    selected = {"all": None, "mask": mask, "key": keys >= threshold}[mode]
    ref = [t.clone() for t in (theta, m, v)]
    adamw_reference_(ref[0], grad, ref[1], ref[2], 4, **hyper, selection=ALL if selected is None else where(selected))
    got = [t.clone() for t in (theta, m, v)]
    kw = {"all": {}, "mask": dict(select_mode=ta.SELECT_MASK, selector=mask),
          "key": dict(select_mode=ta.SELECT_KEY, selector=keys, threshold=threshold)}[mode]
    ta.compact_adamw_triton_(got[0], grad, got[1], got[2], 4, **hyper, **kw)
    if selected is not None:
        for a, b in zip(got, (theta, m, v)):
            assert torch.equal(a[~selected], b[~selected])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_indexed_kernel_matches_reference_with_separate_param_and_grad_indices(device):
    numel, n, k = 6000, 2500, 700
    weight = torch.randn(numel, device=device)
    positions_all = torch.randperm(numel, device=device)[:n].sort().values  # where θ lives in the weight
    grad = torch.randn(n, device=device)
    index = torch.randperm(n, device=device)[:k].sort().values
    positions = positions_all[index]
    m, v = torch.randn(k, device=device), torch.rand(k, device=device)
    ref_theta = weight[positions_all].clone()
    ref_m, ref_v = m.clone(), v.clone()
    adamw_reference_(ref_theta, grad, ref_m, ref_v, 2, selection=subset(index), **HYPER, maximize=False)
    before = weight.clone()
    ta.indexed_adamw_triton_(weight, positions, grad, index, m, v, 2, **HYPER, maximize=False)
    rest = torch.ones(numel, dtype=torch.bool, device=device)
    rest[positions] = False
    assert torch.equal(weight[rest], before[rest])
    torch.testing.assert_close(weight[positions_all], ref_theta, **TOL)
    torch.testing.assert_close(m, ref_m, **TOL)
    torch.testing.assert_close(v, ref_v, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, sparsity", [((3, 5), 0.4), ((33, 65), 0.5), ((64, 129), 0.8), ((17, 1000), 0.3)])
@pytest.mark.parametrize("maximize", [False, True])
def test_bitmap_key_kernel_matches_the_gather_reference(device, shape, sparsity, maximize):
    numel = shape[0] * shape[1]
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel)[: int(round(sparsity * numel))]] = True
    storage = mask_ops._encode_as(pruned.view(shape), mask_ops.MaskEncoding.BITMAP).to(device)
    p = int(pruned.sum())
    weight = torch.randn(shape, device=device)
    grad, m, v = torch.randn(p, device=device), torch.randn(p, device=device), torch.rand(p, device=device)
    keys = selection_keys_reference(grad)
    keys[torch.rand(p, device=device) < 0.3] = -1
    threshold = kth_largest(keys, max(1, p // 3)).clamp_min(0)
    hyper = {**HYPER, "maximize": maximize}
    ref = [t.clone() for t in (weight, m, v)]
    # The reference: gather θ through the mask's index list, step it as a vector, scatter back.
    index = MaskedSlots(ref[0], storage, mask_ops.MaskEncoding.BITMAP, p).flat_indices()
    theta = ref[0].view(-1)[index]
    adamw_reference_(theta, grad, ref[1], ref[2], 3, **hyper, selection=where(keys >= threshold))
    ref[0].view(-1)[index] = theta
    got = [t.clone() for t in (weight, m, v)]
    ta.bitmap_adamw_triton_(got[0], grad, got[1], got[2], storage, True, 3, **hyper, n_selected=p, keys=keys, threshold=threshold)
    selected_theta = keys >= threshold
    changed = torch.zeros(numel, dtype=torch.bool, device=device)
    changed[pruned.to(device).nonzero().squeeze(1)[selected_theta]] = True
    assert torch.equal(got[0].view(-1)[~changed], weight.view(-1)[~changed])
    # the kernel wrote the selected slots (a step can round back to the same float, hence not all)
    assert (got[0].view(-1)[changed] != weight.view(-1)[changed]).float().mean() > 0.9
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("strategy", ["consistency", "random", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.98])
def test_resu_adamw_through_the_kernel_dispatch_matches_the_reference_paths(monkeypatch, strategy, sparsity):
    """ResuAdamW with every CUDA dispatch forced onto the (interpreted) Triton kernels, against the
    plain-PyTorch paths: the glue between passes (thresholds on device, layouts, masks) is covered too."""
    import resu
    from resu.compile import registry
    from resu.core.selective import SelectionConfig
    from tests.test_selective import HYPER, resu_weight, set_theta_grad

    cfg = SelectionConfig(strategy=strategy, tau_stable=0.3, k_select_ratio=0.3)

    def run():
        torch.manual_seed(1)
        p = resu_weight((40, 70), sparsity, seed=2)
        opt = resu.ResuAdamW([p], **HYPER, selective=cfg)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            set_theta_grad(p, torch.randn(p.n_pruned, generator=g))
            opt.step()
        return p.effective_weight().clone(), opt.state[p], opt.selection_stats()

    ref_w, ref_state, ref_stats = run()
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    w, state, stats = run()
    assert stats["n_selected"] == ref_stats["n_selected"] > 0
    assert stats["mean_consistency"] == pytest.approx(ref_stats["mean_consistency"], rel=1e-5)
    torch.testing.assert_close(w, ref_w, **TOL)
    for key, value in ref_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(state[key], value, **TOL)
