"""RESU-Selective in ResuAdamW: which θ slots move, the consistency math against a float64 reference,
static subsets, the enter_resu_ switch, statistics, state_dict resume and torch.compile."""

import io

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

import resu
from resu.core.selective import SelectionConfig
from resu.optim.selective import selective_step_
from resu.optim.adamw_step import MaskedSlots, adamw_reference_, where
from resu.tensors.compact_grad import CompactGrad
from tests.helpers import assert_same_snapshot, model_in_mode, snapshot, train_classifier

HYPER = dict(lr=1e-2, weight_decay=0.1)


def resu_weight(shape, sparsity, seed=0, device="cpu"):
    """A RESU-mode ResuParameter (random mask, θ ~ N(0, 0.25·σ²)); the same values on every device."""
    torch.manual_seed(seed)
    layer = resu.sparsify_(nn.Linear(shape[1], shape[0], bias=False).to(device))
    resu.prune_(layer, sparsity, method="random", generator=torch.Generator().manual_seed(seed))
    resu.enter_resu_(layer, epsilon=0.5, generator=torch.Generator().manual_seed(seed))
    return layer.weight


def set_theta_grad(p, values):
    p.grad = CompactGrad(values, p._mask_storage, p._encoding, p.shape)


def theta_of(p):
    return p._gather_pruned(p.effective_weight()).clone()


def reference_selection(grads, cfg):
    """Seed 000's algorithm in float64 with plain Python ranking: per step (S, C, m, v)."""
    p = grads[0].numel()
    m = torch.zeros(p, dtype=torch.float64)
    v = torch.zeros(p, dtype=torch.float64)
    out = []
    for g32 in grads:
        g = g32.double()
        m = cfg.beta * m + (1 - cfg.beta) * g
        v = cfg.beta * v + (1 - cfg.beta) * g.abs()
        c = m.abs() / (v + cfg.delta)
        order = sorted(range(p), key=lambda i: (-abs(float(g[i])), i))
        screened = set(order[: cfg.screen_count(p)])
        eligible = [i for i in order if i in screened and float(c[i]) > cfg.tau_stable]
        out.append((sorted(eligible[: cfg.select_count(p)]), c, m.clone(), v.clone()))
    return out


@given(
    rows=st.integers(2, 12), cols=st.integers(2, 20), sparsity=st.floats(0.2, 0.9),
    beta=st.floats(0.0, 0.95), tau=st.floats(0.0, 0.95), screen=st.floats(0.05, 1.0), select=st.floats(0.05, 1.0),
    ties=st.booleans(), seed=st.integers(0, 10_000),
)
def test_consistency_step_matches_float64_reference(rows, cols, sparsity, beta, tau, screen, select, ties, seed):
    p = resu_weight((rows, cols), sparsity, seed)
    n = p.n_pruned
    assume(n >= 1)
    cfg = SelectionConfig(beta=beta, tau_stable=tau, k_screen_ratio=screen, k_select_ratio=select)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen) for _ in range(4)]
    if ties:  # many equal magnitudes: ranking must fall back to the lower index
        grads = [g.round(decimals=0) * 0.5 for g in grads]
    expected = reference_selection(grads, cfg)
    for _, c, _, _ in expected:
        assume(bool(((c - tau).abs() > 1e-5).all()))  # fp32 vs fp64 C may straddle τ otherwise
    opt = resu.ResuAdamW([p], **HYPER, selective=cfg)
    active = p.active_mask
    frozen = p.effective_weight()[active].clone()
    for step, (g, (sel, c, m64, v64)) in enumerate(zip(grads, expected), 1):
        theta0 = theta_of(p)
        state = opt.state[p]
        m0 = state["exp_avg"].clone() if state else torch.zeros(n)
        v0 = state["exp_avg_sq"].clone() if state else torch.zeros(n)
        set_theta_grad(p, g)
        opt.step()
        selected = torch.zeros(n, dtype=torch.bool)
        selected[sel] = True
        # The selected slots took exactly the AdamW step; nothing else moved, states included.
        adamw_reference_(theta0, g, m0, v0, step, **HYPER, beta1=0.9, beta2=0.999, eps=1e-8,
                         maximize=False, selection=where(selected))
        assert torch.equal(theta_of(p), theta0)
        assert torch.equal(opt.state[p]["exp_avg"], m0) and torch.equal(opt.state[p]["exp_avg_sq"], v0)
        assert torch.equal(p.effective_weight()[active], frozen)
        torch.testing.assert_close(opt.state[p]["selection_m"].double(), m64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["selection_v"].double(), v64, rtol=1e-5, atol=1e-6)
        stats = opt.selection_stats()
        assert stats["n_selected"] == len(sel) and stats["n_slots"] == n
        assert stats["fraction_selected"] == pytest.approx(len(sel) / n)
        assert stats["mean_consistency"] == pytest.approx(float(c.mean()), rel=1e-4, abs=1e-6)


def test_selected_slots_really_move_and_the_count_is_exact():
    p = resu_weight((40, 50), 0.5)
    cfg = SelectionConfig(tau_stable=0.0, k_screen_ratio=0.5, k_select_ratio=0.2)
    opt = resu.ResuAdamW([p], **HYPER, selective=cfg)
    for _ in range(3):
        before = theta_of(p)
        set_theta_grad(p, torch.randn(p.n_pruned))
        opt.step()
        moved = (theta_of(p) != before).sum().item()
        assert moved == cfg.select_count(p.n_pruned) == opt.selection_stats()["n_selected"]


@pytest.mark.parametrize("strategy", ["random", "magnitude"])
def test_static_subset_trains_k_slots_with_k_sized_states(strategy):
    p = resu_weight((30, 40), 0.5)
    cfg = SelectionConfig(strategy=strategy, k_select_ratio=0.25)
    k = cfg.select_count(p.n_pruned)
    opt = resu.ResuAdamW([p], **HYPER, selective=cfg)
    first_grad = torch.randn(p.n_pruned)
    moved_sets = []
    for step in range(4):
        before = theta_of(p)
        set_theta_grad(p, first_grad if step == 0 else torch.randn(p.n_pruned))
        opt.step()
        moved_sets.append((theta_of(p) != before).nonzero().squeeze(1))
    state = opt.state[p]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (k,)
    assert "selection_m" not in state
    assert all(torch.equal(s, state["subset"]) for s in moved_sets)  # the same k slots every step
    assert state["subset"].numel() == k and torch.equal(state["subset"], state["subset"].sort().values)
    if strategy == "magnitude":
        order = sorted(range(p.n_pruned), key=lambda i: (-abs(float(first_grad[i])), i))
        assert state["subset"].tolist() == sorted(order[:k])
    stats = opt.selection_stats()
    assert stats["mean_consistency"] == 0.0 and stats["n_selected"] == k


def test_random_subset_is_reproducible_and_refreshes_every_n_steps():
    def run():
        torch.manual_seed(5)
        p = resu_weight((20, 30), 0.6, seed=1)
        opt = resu.ResuAdamW([p], **HYPER, selective=SelectionConfig(strategy="random", refresh_every=3))
        subsets, steps = [], []
        for _ in range(7):
            set_theta_grad(p, torch.randn(p.n_pruned))
            opt.step()
            subsets.append(opt.state[p]["subset"].clone())
            steps.append(int(opt.state[p]["step"]))
        return subsets, steps, theta_of(p)

    subsets, steps, theta = run()
    again, steps_again, theta2 = run()
    assert all(torch.equal(a, b) for a, b in zip(subsets, again)) and torch.equal(theta, theta2)
    assert steps_again == steps
    assert steps == [1, 2, 3, 1, 2, 3, 1]  # Adam restarts for each new subset
    assert torch.equal(subsets[0], subsets[2]) and not torch.equal(subsets[2], subsets[3])
    assert not torch.equal(subsets[3], subsets[6])


def test_flat_theta_vector_steps_like_theta_in_the_weight():
    """The QRESU-style target (a plain 1-D θ) and RESU's pruned slots give bitwise the same θ."""
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)
    for cfg in (SelectionConfig(tau_stable=0.3), SelectionConfig(strategy="magnitude", k_select_ratio=0.3)):
        p = resu_weight((25, 33), 0.55, seed=4)
        theta = theta_of(p)
        n = theta.numel()
        states = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros(n if not cfg.is_static else cfg.select_count(n))}
                  for _ in range(2)]
        for s in states:
            s["exp_avg_sq"] = torch.zeros_like(s["exp_avg"])
        for _ in range(3):
            g = torch.randn(n)
            selective_step_(theta, g, states[0], cfg, hyper)
            selective_step_(MaskedSlots.theta_of(p), g, states[1], cfg, hyper)
            assert torch.equal(theta, theta_of(p))
        assert torch.equal(states[0]["exp_avg"], states[1]["exp_avg"])




@pytest.mark.parametrize(
    "cfg",
    [SelectionConfig(tau_stable=0.3), SelectionConfig(strategy="random", refresh_every=2),
     SelectionConfig(strategy="magnitude", k_select_ratio=0.4)],
    ids=["consistency", "random", "magnitude"],
)
def test_state_dict_resume_is_bitwise_identical(cfg):
    torch.manual_seed(0)
    model = model_in_mode("resu")
    opt = resu.ResuAdamW(model.parameters(), **HYPER, selective=cfg)
    train_classifier(model, opt, steps=3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = resu.sparsify_(nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 5)))
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = resu.ResuAdamW(fresh.parameters(), **HYPER)  # the config comes back with the state
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.param_groups[0]["selective"] == cfg
    for p in fresh.parameters():
        if "subset" in fresh_opt.state[p]:
            assert fresh_opt.state[p]["subset"].dtype == torch.int64
    train_classifier(model, opt, steps=4, seed=2)
    train_classifier(fresh, fresh_opt, steps=4, seed=2)
    for a, b in zip(model.parameters(), fresh.parameters()):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b
        assert torch.equal(wa, wb)
        for key, value in opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, fresh_opt.state[b][key]), key


def test_enter_resu_tag_reaches_the_optimizer_and_exit_clears_it():
    model = model_in_mode("sparse")
    cfg = SelectionConfig(k_select_ratio=0.3, tau_stable=0.0)
    resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0), selective=cfg)
    rps = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    assert all(p._selective is cfg for p in rps)
    opt = resu.ResuAdamW(model.parameters(), **HYPER)
    train_classifier(model, opt, steps=2, seed=3)
    stats = opt.selection_stats()
    assert stats["n_slots"] == sum(p.n_pruned for p in rps)
    assert stats["n_selected"] == sum(cfg.select_count(p.n_pruned) for p in rps)
    # A group's own config wins over the tag.
    override = SelectionConfig(strategy="magnitude", k_select_ratio=0.1)
    opt2 = resu.ResuAdamW(model.parameters(), **HYPER, selective=override)
    train_classifier(model, opt2, steps=1, seed=4)
    assert opt2.selection_stats()["n_selected"] == sum(override.select_count(p.n_pruned) for p in rps)
    resu.exit_resu_(model, commit=False)
    assert all(p._selective is None for p in rps)


def test_non_theta_weights_are_stepped_as_usual():
    """SPARSE weights and plain parameters in a selective group follow plain ResuAdamW bitwise."""
    a, b = model_in_mode("sparse", seed=3), model_in_mode("sparse", seed=3)
    opt_a = resu.ResuAdamW(a.parameters(), **HYPER, selective=SelectionConfig())
    opt_b = resu.ResuAdamW(b.parameters(), **HYPER)
    train_classifier(a, opt_a, steps=3, seed=5)
    train_classifier(b, opt_b, steps=3, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        wa = pa.effective_weight() if isinstance(pa, resu.ResuParameter) else pa
        wb = pb.effective_weight() if isinstance(pb, resu.ResuParameter) else pb
        assert torch.equal(wa, wb)
    assert opt_a.selection_stats() == {"mean_consistency": 0.0, "fraction_selected": 0.0, "n_selected": 0, "n_slots": 0}


def test_states_restart_for_a_new_resu_phase():
    model = model_in_mode("resu")
    p = model[0].weight
    opt = resu.ResuAdamW(model.parameters(), **HYPER, selective=SelectionConfig())
    train_classifier(model, opt, steps=3, seed=1)
    resu.exit_resu_(model, commit=False)
    resu.enter_resu_(model, epsilon=0.5)
    train_classifier(model, opt, steps=1, seed=2)
    assert int(opt.state[p]["step"]) == 1
    # After one step from zero EMAs, C = |g| / (|g| + δ/(1−β)): about 1 wherever the gradient is not tiny.
    c = opt.state[p]["selection_m"].abs() / (opt.state[p]["selection_v"] + 1e-8)
    assert (c > 0.99).float().mean() > 0.9


def test_compiled_model_trains_like_eager():
    cfg = SelectionConfig(tau_stable=0.2, k_select_ratio=0.3)
    eager, comp = model_in_mode("resu", seed=2), model_in_mode("resu", seed=2)
    opt_e = resu.ResuAdamW(eager.parameters(), **HYPER, selective=cfg)
    opt_c = resu.ResuAdamW(comp.parameters(), **HYPER, selective=cfg)
    compiled = torch.compile(comp, fullgraph=True)
    train_classifier(eager, opt_e, steps=3, seed=6)
    train_classifier(compiled, opt_c, steps=3, seed=6)
    assert opt_c.selection_stats()["n_selected"] == opt_e.selection_stats()["n_selected"] > 0
    for a, b in zip(eager.parameters(), comp.parameters()):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)


def test_bad_selective_arguments():
    params = list(model_in_mode("resu").parameters())
    with pytest.raises(ValueError, match="selective"):
        resu.ResuAdamW(params, selective={"beta": 0.9})
    with pytest.raises(ValueError, match="amsgrad"):
        resu.ResuAdamW(params, amsgrad=True, selective=SelectionConfig())
    with pytest.raises(ValueError, match="amsgrad"):
        resu.ResuAdamW([{"params": params, "amsgrad": True}], selective=SelectionConfig())
    tagged = model_in_mode("sparse")
    resu.enter_resu_(tagged, selective=SelectionConfig())
    opt = resu.ResuAdamW(tagged.parameters(), amsgrad=True)
    tagged(torch.randn(4, 12)).sum().backward()
    before = snapshot(tagged)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    assert_same_snapshot(before, snapshot(tagged))  # refused before any parameter moved
    model = model_in_mode("sparse")
    before = snapshot(model)
    with pytest.raises(ValueError, match="selective"):
        resu.enter_resu_(model, selective="consistency")
    assert_same_snapshot(before, snapshot(model))  # still SPARSE, nothing written


def test_stats_before_any_step_are_zero():
    opt = resu.ResuAdamW(model_in_mode("resu").parameters(), selective=SelectionConfig())
    assert opt.selection_stats() == {"mean_consistency": 0.0, "fraction_selected": 0.0, "n_selected": 0, "n_slots": 0}


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["consistency", "random", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.98])  # bitmap mask (fused kernel) and index mask
def test_cuda_selective_training_matches_cpu(strategy, sparsity):
    cfg = SelectionConfig(strategy=strategy, tau_stable=0.2, k_select_ratio=0.3)
    cpu = resu_weight((64, 300), sparsity, seed=9)
    gpu = resu_weight((64, 300), sparsity, seed=9, device="cuda")
    opts = []
    for p in (cpu, gpu):
        torch.manual_seed(3)  # the random subset's seed
        opts.append(resu.ResuAdamW([p], **HYPER, selective=cfg))
    for _ in range(4):
        g = torch.randn(cpu.n_pruned)
        set_theta_grad(cpu, g)
        set_theta_grad(gpu, g.cuda())
        for o in opts:
            torch.manual_seed(3)
            o.step()
    assert opts[1].selection_stats()["n_selected"] == opts[0].selection_stats()["n_selected"]
    torch.testing.assert_close(opts[1].selection_stats()["mean_consistency"], opts[0].selection_stats()["mean_consistency"])
    torch.testing.assert_close(gpu.effective_weight().cpu(), cpu.effective_weight(), rtol=1e-5, atol=1e-6)
    for key, value in opts[0].state[cpu].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(opts[1].state[gpu][key].cpu(), value, rtol=1e-5, atol=1e-6)
