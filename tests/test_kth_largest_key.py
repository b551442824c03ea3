"""The exact k-th largest selection key of RESU-Selective by sample select, against the top-k threshold:
the plan, the PyTorch reference, the Triton kernels (on CPU under the interpreter), their exact
fallbacks, and the consistency pass that carries both thresholds' window passes. Fresh random keys with
ties, zeros, all-equal magnitudes, infinities, NaN and masked (−1) slots."""

import dataclasses

import pytest
import torch

from resu.compile import registry
from resu.optim import consistency as C
from resu.optim.selection_config import SelectionConfig

KINDS = ["normal", "ties", "zeros", "equal", "extremes"]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def _grad(kind, n, gen):
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "ties":  # few distinct |g|: the select must break ties by position
        return torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "equal":
        return torch.full((n,), -0.75)
    # zeros, huge, subnormal, infinite and NaN magnitudes together
    scale = torch.tensor([0.0, 1e30, 1e-40, float("inf"), float("nan")])
    return torch.randn(n, generator=gen) * scale[torch.randint(0, 5, (n,), generator=gen)]


def _keys(kind, n, gen, masked):
    keys = C.selection_keys_reference(_grad(kind, n, gen))
    if masked:  # ineligible slots, as the consistency pass leaves them
        keys[torch.rand(n, generator=gen) < 0.7] = -1
    return keys


def _ks(n, gen):
    return sorted({1, n, int(torch.randint(1, n + 1, (), generator=gen))})


def _missing(plan):
    """The plan with its window moved off the answer (splitters 0 … 1, no open end), so that the
    select must take its exact fallback; the keys' count above the window is then at least k."""
    return dataclasses.replace(plan, j_lo=0, j_hi=min(1, plan.m - 1), upper_open=False, lower_open=False)


@pytest.fixture
def on_triton(monkeypatch):
    """Route every tensor to the Triton kernels (the interpreter on CPU)."""
    pytest.importorskip("resu.compile.triton_sample_select")
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)


# ------------------------------------------------------------------ plan and reference (plain PyTorch)
def test_sample_positions_take_one_slot_per_stratum():
    for n, m in [(10, 10), (1000, 64), (12345, 256), (2**20 + 7, 1024)]:
        pos = C.sample_positions(n, m)
        j = torch.arange(m)
        assert pos.shape == (m,) and bool((pos >= j * n // m).all()) and bool((pos < (j + 1) * n // m).all())
    assert torch.equal(C.sample_positions(77, 77), torch.arange(77))


def test_sample_plan_brackets_the_expected_rank():
    """The window's sample ranks bracket λ = k·m/n, the expected count of sampled keys ≥ the answer
    (j_lo ≤ λ − 1, λ ≤ j_hi, unless that end is open), by a margin that grows like √m, not like m."""
    for n, k, m in [(10**6, 1, 1024), (10**6, 10**6, 1024), (10**6, 5 * 10**5, 1024), (10**6, 2 * 10**5, 4096),
                    (500, 123, 1024)]:
        plan = C.sample_plan(n, k, m)
        lam = k * plan.m / n
        assert (plan.upper_open and plan.j_lo == 0) or plan.j_lo <= lam - 1
        assert (plan.lower_open and plan.j_hi == plan.m - 1) or plan.j_hi >= lam
        assert plan.width <= 2 * (7 + (40 * plan.m * (k / n) * (1 - k / n)) ** 0.5) + 16
        assert plan.small <= plan.cap <= n and plan.bins >= plan.width + 1
    small = C.sample_plan(500, 123, 1024)
    assert small.m == 500 and (small.j_lo, small.j_hi) == (122, 123)  # every key sampled: exact ranks
    assert C.sample_size(22_544_384) == 8192 and C.sample_size(1000) == 256 and C.sample_size(10**5) == 512
    with pytest.raises(ValueError, match="`k`"):
        C.sample_plan(10, 0)
    with pytest.raises(ValueError, match="power of two"):
        C.sample_plan(10**5, 7, sample=1000)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_key_equals_topk_threshold(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5000, (), generator=gen))
    keys = _keys(kind, n, gen, masked=seed % 2)
    for k in _ks(n, gen):
        for sample in (None, 64, 256):
            assert torch.equal(C.kth_largest_key(keys, k, C.sample_plan(n, k, sample)), C.kth_largest(keys, k)), k


def test_reference_takes_the_exact_fallback_when_the_window_misses():
    gen = torch.Generator().manual_seed(5)
    keys = _keys("normal", 4000, gen, masked=False)
    k = 2500
    plan = C.sample_plan(4000, k, 256)
    assert C.sample_select_reference(keys, k, plan)["hit"]
    for broken in (_missing(plan), dataclasses.replace(plan, cap=3), dataclasses.replace(plan, small=1)):
        out = C.sample_select_reference(keys, k, broken)
        assert not out["hit"] and torch.equal(out["key"], C.kth_largest(keys, k))


def test_kth_largest_key_refuses_a_bad_k():
    keys = C.selection_keys_reference(torch.randn(10))
    with pytest.raises(ValueError, match="`k`"):
        C.kth_largest_key(keys, 0)
    with pytest.raises(ValueError, match="`k`"):
        C.kth_largest_key(keys, 11)


# ------------------------------------------------------------------ Triton kernels (interpreter on CPU)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(2))
def test_sample_select_kernels_equal_topk_threshold(on_triton, device, kind, seed):
    gen = torch.Generator().manual_seed(seed + 50)
    n = int(torch.randint(1, 12000, (), generator=gen))
    keys = _keys(kind, n, gen, masked=seed % 2).to(device)
    for k in _ks(n, gen):
        got = C.kth_largest_key(keys, k)
        assert got.device.type == device and got.shape == ()
        assert torch.equal(got, C.kth_largest(keys, k)), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, masked, sample", [("normal", False, 256), ("ties", True, 512), ("zeros", False, 128),
                                                  ("extremes", True, 256)])
def test_sample_select_kernels_match_the_reference_step_by_step(on_triton, device, kind, masked, sample):
    """Splitters, window counts, bucket counts, the answer's bucket and rank in it: the kernels' state
    equals the PyTorch reference's, over ~30k keys (several programs in every launch)."""
    from resu.compile import triton_sample_select as ts
    from resu.compile import triton_select_state as st

    gen = torch.Generator().manual_seed(len(kind) + sample)
    n = 30000 + int(torch.randint(0, 5000, (), generator=gen))
    keys = _keys(kind, n, gen, masked)
    for k in (1, n // 7, n // 2):
        plan = C.sample_plan(n, k, sample)
        ref = C.sample_select_reference(keys, k, plan)
        got = ts.sample_select_triton(keys.to(device), k, plan)
        state = got.state.cpu()
        assert torch.equal(got.split.cpu(), ref["split"])
        assert [int(state[f]) for f in (st.N_VALID, st.N_ABOVE, st.N_WINDOW)] == \
            [ref["n_valid"], ref["n_above"], ref["n_window"]]
        assert torch.equal(got.counts.cpu()[::st.PAD][:plan.width + 1], ref["counts"])
        assert ref["hit"] or k > ref["n_valid"], "the sample's window should hold the answer here"
        if ref["hit"]:
            assert [int(state[f]) for f in (st.BUCKET, st.RANK2, st.N_SMALL)] == \
                [ref["bucket"], ref["rank"], ref["n_small"]]
        assert int(state[st.RESULT]) == int(ref["key"]) == int(C.kth_largest(keys, k))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_select_kernels_rank_keys_away_from_their_slots(on_triton, device):
    """Distinct keys that are not at their own slots (a shuffled key vector) are ranked as int64, not
    by their |g| bits with ties to the lower slot: still the top-k threshold."""
    from resu.compile import triton_sample_select as ts
    from resu.compile import triton_select_state as st

    gen = torch.Generator().manual_seed(4)
    n = 20000
    keys = _keys("ties", n, gen, masked=True)
    keys = keys[torch.randperm(n, generator=gen)]
    for k in (1, n // 10, int((keys >= 0).sum())):
        plan = C.sample_plan(n, k, 256)
        got = ts.sample_select_triton(keys.to(device), k, plan)
        assert torch.equal(got.split.cpu(), C.sample_select_reference(keys, k, plan)["split"])
        assert torch.equal(got.state[st.RESULT].cpu(), C.kth_largest(keys, k))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_select_kernels_over_many_programs(on_triton, device):
    """262k keys, half masked, the default plan (1024 samples): 65 window-pass programs append tens of
    thousands of keys to one window buffer, which some thirty extraction programs read."""
    assert C.sample_plan(2**18 + 123, (2**18 + 123) // 3).m == 1024
    from resu.compile import triton_sample_select as ts
    from resu.compile import triton_select_state as st

    gen = torch.Generator().manual_seed(3)
    n = 2**18 + 123
    keys = _keys("normal", n, gen, masked=False)
    keys[torch.rand(n, generator=gen) < 0.5] = -1
    k = n // 3
    got = ts.sample_select_triton(keys.to(device), k)
    ref = C.sample_select_reference(keys, k)
    assert ref["hit"] and int(got.state[st.N_WINDOW]) == ref["n_window"] > 20 * st.SUB
    assert torch.equal(got.state[st.RESULT].cpu(), C.kth_largest(keys, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "equal"])
def test_sample_select_kernels_fall_back_exactly(on_triton, device, kind):
    """A window that misses the answer, a window buffer or a bucket buffer too small: the single-program
    radix fallback still gives the top-k threshold."""
    from resu.compile import triton_sample_select as ts

    gen = torch.Generator().manual_seed(7)
    n = 6000
    keys = _keys(kind, n, gen, masked=True).to(device)
    valid = int((keys >= 0).sum())
    for k in (1, valid // 3, valid, valid + 1):
        plan = C.sample_plan(n, k, 256)
        for broken in (_missing(plan), dataclasses.replace(plan, cap=5), dataclasses.replace(plan, small=1)):
            assert not C.sample_select_reference(keys.cpu(), k, broken)["hit"]
            assert torch.equal(ts.kth_largest_key_triton(keys, k, broken), C.kth_largest(keys, k)), (k, broken)


# ------------------------------------------------------------------ the consistency pass carrying both selects
def _reference_selection(g, m, v, k_screen, k_select, cfg):
    keys = C.selection_keys_reference(g)
    screen = C.kth_largest(keys, k_screen)
    sum_c, n_eligible = C.consistency_pass_reference_(g, m, v, keys, screen, **cfg)
    return keys, C.kth_largest(keys, k_select).clamp_min(0), sum_c, n_eligible, screen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, state_dtype, maximize, tau, sample", [
    ("normal", torch.float32, False, 0.3, 256),
    ("ties", torch.float32, True, 0.3, 512),
    ("normal", torch.bfloat16, True, 0.9, 64),   # few consistent slots: the select is often −1
    ("zeros", torch.float32, False, 0.3, 256),
])
def test_fused_consistency_selection_matches_the_topk_path(on_triton, device, kind, state_dtype, maximize, tau, sample):
    from resu.compile import triton_consistency_select as ts

    gen = torch.Generator().manual_seed(11)
    n = 9000 + int(torch.randint(0, 3000, (), generator=gen))
    cfg = dict(beta=0.8, delta=1e-8, tau=tau, maximize=maximize)
    g = _grad(kind, n, gen) + 0.2 * (kind != "zeros")
    m0 = (torch.randn(n, generator=gen) * 0.1 + 0.05).to(state_dtype)
    v0 = (m0.float().abs() + torch.rand(n, generator=gen) * 0.2).to(state_dtype)
    for k_screen, k_select in [(n // 2, n // 5), (1, 1), (n, n), (n, 1), (n // 3, n // 2)]:
        plans = (C.sample_plan(n, k_screen, sample), C.sample_plan(n, k_select, sample))
        ref = [t.clone() for t in (m0, v0)]
        keys_ref, thr_ref, sum_ref, n_ref, screen_ref = _reference_selection(g, *ref, k_screen, k_select, cfg)
        got = [t.clone().to(device) for t in (m0, v0)]
        out = ts.consistency_select_triton(g.to(device), *got, k_screen, k_select, **cfg, plans=plans)
        # EMAs as the reference (bf16 rounding may differ by one ulp); C decisions away from τ agree.
        tol = dict(rtol=1e-5, atol=1e-6) if state_dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
        torch.testing.assert_close(got[0].cpu(), ref[0], **tol)
        torch.testing.assert_close(got[1].cpu(), ref[1], **tol)
        keys = out.keys.cpu()
        c = ref[0].float().abs() / (ref[1].float() + 1e-8)
        clear = (c - tau).abs() > (1e-4 if state_dtype == torch.float32 else 5e-2)
        all_keys = C.selection_keys_reference(g)
        assert torch.equal(keys[clear], torch.where(c > tau, all_keys, -1)[clear])
        # Thresholds exact for the keys the kernel kept, and the same selected slots as the top-k path.
        assert torch.equal(out.screen.cpu(), screen_ref)
        assert torch.equal(out.select.cpu(), C.kth_largest(keys, k_select))
        assert int(out.threshold) == max(int(screen_ref), int(out.select))
        assert int(out.n_eligible) == int((keys >= screen_ref).sum())
        selected = keys >= out.threshold.cpu()
        assert int(selected.sum()) == min(int(out.n_eligible), k_select)
        if bool(clear.all()):
            assert torch.equal(selected, keys_ref >= thr_ref) and int(out.n_eligible) == int(n_ref)
        rtol = 2e-2 if state_dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(out.sum_c.cpu(), sum_ref.float(), rtol=rtol, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_consistency_selection_falls_back_exactly(on_triton, device):
    """Both windows off the answer (and a bucket buffer too small): exact thresholds and count."""
    from resu.compile import triton_consistency_select as ts

    gen = torch.Generator().manual_seed(12)
    n = 5000
    cfg = dict(beta=0.5, delta=1e-8, tau=0.2, maximize=False)
    g = torch.randn(n, generator=gen) + 0.3
    m0, v0 = torch.full((n,), 0.1), torch.full((n,), 0.2)
    k_screen, k_select = n // 2, n // 5
    plans = C.sample_plan(n, k_screen, 256), C.sample_plan(n, k_select, 256)
    for broken in ((_missing(plans[0]), _missing(plans[1])), (dataclasses.replace(plans[0], small=1), plans[1])):
        ref = [t.clone() for t in (m0, v0)]
        keys_ref, thr_ref, _, n_ref, screen_ref = _reference_selection(g, *ref, k_screen, k_select, cfg)
        got = [t.clone().to(device) for t in (m0, v0)]
        out = ts.consistency_select_triton(g.to(device), *got, k_screen, k_select, **cfg, plans=broken)
        keys = out.keys.cpu()
        assert torch.equal(out.screen.cpu(), screen_ref)
        assert torch.equal(out.select.cpu(), C.kth_largest(keys, k_select))
        assert int(out.n_eligible) == int((keys >= screen_ref).sum())
        assert int(out.threshold) == max(int(screen_ref), int(out.select))
        if device == "cpu":  # the interpreter computes C exactly as the reference (a GPU may fuse a*b + c)
            assert int(out.n_eligible) == int(n_ref)
            assert torch.equal(keys >= out.threshold.cpu(), keys_ref >= thr_ref)


@pytest.mark.parametrize("seed", range(2))
def test_consistency_selection_is_the_same_with_every_select(monkeypatch, seed):
    pytest.importorskip("resu.compile.triton_sample_select")
    gen = torch.Generator().manual_seed(seed)
    n = 3000
    config = SelectionConfig(k_screen_ratio=0.5, k_select_ratio=0.2, tau_stable=0.3)
    emas = [torch.zeros(n), torch.zeros(n)]
    results = {}
    for name in C.SELECT_IMPLS:
        monkeypatch.setattr(C, "select_impl", {"cpu": name})
        monkeypatch.setattr(registry, "use_triton", (lambda *t: True) if name == "fused" else (lambda *t: False))
        m, v = (t.clone() for t in emas)
        g2 = torch.Generator().manual_seed(seed + 100)
        out = []
        for _ in range(4):  # the EMAs build up, so later steps have eligible slots
            grad = torch.randn(n, generator=g2) + 0.5
            keys, threshold, sum_c, n_sel = C.consistency_selection(grad, m, v, config, maximize=False)
            out.append((keys >= threshold, n_sel, sum_c, m.clone()))
        results[name] = out
    for name in ("key", "fused"):
        for (a_sel, a_n, a_c, a_m), (b_sel, b_n, b_c, b_m) in zip(results["topk"], results[name]):
            assert torch.equal(a_sel, b_sel) and torch.equal(a_n, b_n) and torch.equal(a_m, b_m), name
            torch.testing.assert_close(a_c, b_c)
    assert int(results["topk"][-1][1]) > 0
    monkeypatch.setattr(C, "select_impl", {"cpu": "sort"})
    with pytest.raises(ValueError, match="select_impl"):
        C.consistency_selection(torch.randn(n), *emas, config, maximize=False)


def test_resu_adamw_with_the_fused_selection_matches_the_reference_path(monkeypatch):
    """ResuAdamW steps through the fused kernels (interpreted) and through the plain-PyTorch path."""
    pytest.importorskip("resu.compile.triton_sample_select")
    import resu
    from tests.test_selective import HYPER, resu_weight, set_theta_grad

    cfg = SelectionConfig(tau_stable=0.3, k_select_ratio=0.3)

    def run():
        p = resu_weight((40, 70), 0.5, seed=2)
        opt = resu.ResuAdamW([p], **HYPER, selective=cfg)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            set_theta_grad(p, torch.randn(p.n_pruned, generator=g))
            opt.step()
        return p.effective_weight().clone(), opt.selection_stats()

    ref_w, ref_stats = run()
    monkeypatch.setattr(C, "select_impl", {"cpu": "fused"})
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    w, stats = run()
    assert stats["n_selected"] == ref_stats["n_selected"] > 0
    assert stats["mean_consistency"] == pytest.approx(ref_stats["mean_consistency"], rel=1e-5)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
