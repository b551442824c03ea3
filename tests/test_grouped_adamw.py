"""The grouped AdamW step (many weights, one launch per kind) gives the per-weight results.

Bitwise under Triton's interpreter (CPU). On CUDA the two kernels run the same operations, but the
compiler contracts multiply-adds into FMAs differently in each, so results differ by rounding (up to
~30 ulp of a weight on an H200; m and v by at most 1 ulp): compared there with the tolerance of the
other GPU-vs-reference tests, as torch.optim's foreach and for-loop paths may differ too.

Kernel level: :func:`grouped_adamw_triton_` against the per-weight kernels (compact and bitmap), on
fresh random weights, masks, gradients, states and step counts.
Optimizer level: ``ResuAdamW`` (grouped by default) against ``ResuAdamW(foreach=False)`` on a model
mixing RESU (bitmap and index masks), QRESU, SPARSE and plain weights, on the reference path and
with the kernels forced on.
"""

import pytest
import torch
import torch.nn as nn

import resu
from resu.compile import registry
from resu.optim import adamw_step as A
from resu.tensors import mask as mask_ops

triton_adamw = pytest.importorskip("resu.compile.triton_adamw")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _assert_same(a, b, what):
    if a.device.type == "cuda":  # FMA contraction differs between the two compiled kernels (module doc)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)
    else:
        assert torch.equal(a, b), what


def _bitmap_case(gen, shape, sparsity, select_pruned, dense_grad):
    numel = shape[0] * shape[1]
    pruned = torch.zeros(numel, dtype=torch.bool)
    pruned[torch.randperm(numel, generator=gen)[: int(round(sparsity * numel))]] = True
    storage = mask_ops._encode_as(pruned.view(shape), mask_ops.MaskEncoding.BITMAP)
    n_sel = int(pruned.sum()) if select_pruned else numel - int(pruned.sum())
    weight = torch.randn(shape, generator=gen)
    grad = torch.randn(shape if dense_grad else (n_sel,), generator=gen)
    return dict(weight=weight, grad=grad, storage=storage, k=int(pruned.sum()), n_sel=n_sel, pruned=select_pruned,
                m=torch.randn(n_sel, generator=gen), v=torch.rand(n_sel, generator=gen))


def _compact_case(gen, n):
    return dict(weight=torch.randn(n, generator=gen), grad=torch.randn(n, generator=gen),
                m=torch.randn(n, generator=gen), v=torch.rand(n, generator=gen))


def _clone(case):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("maximize", [False, True])
def test_grouped_kernel_equals_per_weight_kernels_bitwise(device, seed, maximize):
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(7):
        step = int(torch.randint(1, 9, (), generator=gen))
        if i % 3 == 0:
            n = int(torch.randint(1, 3000, (), generator=gen))
            cases.append(("compact", step, _compact_case(gen, n)))
        else:
            shape = (int(torch.randint(1, 40, (), generator=gen)), int(torch.randint(1, 90, (), generator=gen)))
            sparsity = [0.0, 0.3, 0.5, 0.9, 1.0][int(torch.randint(0, 5, (), generator=gen))]
            cases.append(("bitmap", step, _bitmap_case(gen, shape, sparsity, bool(i % 2), i % 4 == 2)))
    cases = [(kind, step, {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()})
             for kind, step, case in cases]
    hyper = {**HYPER, "maximize": maximize}

    singles = []
    for kind, step, case in cases:
        c = _clone(case)
        if kind == "compact":
            triton_adamw.compact_adamw_triton_(c["weight"], c["grad"], c["m"], c["v"], step, **hyper)
        else:
            triton_adamw.bitmap_adamw_triton_(c["weight"], c["grad"], c["m"], c["v"], c["storage"], c["pruned"], step,
                                              **hyper, n_selected=c["n_sel"])
        singles.append(c)

    grouped, items = [], []
    for kind, step, case in cases:
        c = _clone(case)
        grouped.append(c)
        if kind == "compact":
            items.append((triton_adamw.KIND_COMPACT, c["weight"], c["grad"], c["m"], c["v"], step, None,
                          c["weight"].numel()))
        else:
            code = triton_adamw.KIND_BITMAP_PRUNED if c["pruned"] else triton_adamw.KIND_BITMAP_ACTIVE
            if c["grad"].numel() == c["weight"].numel():
                code |= triton_adamw.GRAD_DENSE
            items.append((code, c["weight"], c["grad"].reshape(-1), c["m"], c["v"], step, c["storage"], c["n_sel"]))
    triton_adamw.grouped_adamw_triton_(items, **hyper)

    moved = False
    for case, single, group in zip(cases, singles, grouped):
        for key in ("weight", "m", "v"):
            _assert_same(group[key], single[key], key)
        moved |= not torch.equal(group["weight"], case[2]["weight"])
    assert moved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [3, 4])
def test_grouped_kernel_matches_the_reference_on_whole_and_partial_blocks(device, seed):
    """Whole blocks take the unmasked (vector) path, the last block of each weight the masked one. A θ
    that is a view one element into its buffer is not 16-byte aligned, and one weight whose pruned and
    active slots are both stepped in one call (two launches, one per kind) gets both steps. Unaligned
    pointers change the compiled variant, never the result. Unselected slots holding -0.0 and a NaN keep their bits, and nothing past a
    compact vector's end is written."""
    gen = torch.Generator().manual_seed(seed)
    n = 12287  # eleven whole blocks and a partial one of 1023 slots: two programs, the second one short
    bufs = {key: torch.randn(n + 3, generator=gen) for key in ("weight", "grad", "m", "v")}
    bufs["v"].abs_()
    exact = _bitmap_case(gen, (64, 64), 0.5, True, False)  # whole blocks only, inside a guarded buffer
    exact_buf = torch.randn(8 + 64 * 64 + 1024, generator=gen)
    exact_buf[8:8 + 64 * 64] = exact["weight"].reshape(-1)
    sparse = _bitmap_case(gen, (30, 70), 0.9, False, False)  # 10% of the slots: accessed slot by slot
    ragged = _bitmap_case(gen, (37, 61), 0.7, True, True)
    pruned = mask_ops.pruned_bool(ragged["storage"], mask_ops.MaskEncoding.BITMAP, 37 * 61, ragged["k"])
    active = (~pruned).nonzero().reshape(-1)
    ragged["weight"].view(-1)[active[:2]] = torch.tensor([-0.0, float("nan")])
    both = _bitmap_case(gen, (40, 50), 0.5, True, False)
    n_active = both["weight"].numel() - both["k"]
    both_active = dict(m=torch.randn(n_active, generator=gen), v=torch.rand(n_active, generator=gen),
                       grad=torch.randn(n_active, generator=gen))
    bufs = {k: v.to(device) for k, v in bufs.items()}
    compact = {key: buf[1:n + 1] for key, buf in bufs.items()}  # one element in: not 16-byte aligned
    exact, ragged, both, sparse = ({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
                                   for c in (exact, ragged, both, sparse))
    exact_buf = exact_buf.to(device)
    exact["weight"] = exact_buf[8:8 + 64 * 64].view(64, 64)
    both_active = {k: v.to(device) for k, v in both_active.items()}
    cases = [compact, exact, ragged, both, sparse]
    before = [c["weight"].clone() for c in cases]
    guards = [bufs["weight"][n + 1:].clone(), exact_buf[8 + 64 * 64:].clone()]

    def reference(case, select_pruned, grad, m, v, step, weight=None):
        if "storage" in case:
            target = A.MaskedSlots(case["weight"].clone() if weight is None else weight, case["storage"],
                                   mask_ops.MaskEncoding.BITMAP, case["k"], select_pruned)
        else:
            target = case["weight"].clone()
        m, v = m.clone(), v.clone()
        A.adamw_reference_(target, grad, m, v, step, **HYPER, maximize=False)
        return A.holder(target), m, v

    expect = {"compact": reference(compact, True, compact["grad"], compact["m"], compact["v"], 2),
              "exact": reference(exact, True, exact["grad"], exact["m"], exact["v"], 5),
              "ragged": reference(ragged, True, ragged["grad"], ragged["m"], ragged["v"], 1),
              "sparse": reference(sparse, False, sparse["grad"], sparse["m"], sparse["v"], 6)}
    both_pruned = reference(both, True, both["grad"], both["m"], both["v"], 3)
    both_weight, both_m, _ = reference(both, False, both_active["grad"], both_active["m"], both_active["v"], 4,
                                       weight=both_pruned[0])  # then the same weight's active slots

    K = triton_adamw
    whole = [
        (K.KIND_COMPACT, compact["weight"], compact["grad"], compact["m"], compact["v"], 2, None, n),
        (K.KIND_BITMAP_PRUNED, exact["weight"], exact["grad"], exact["m"], exact["v"], 5, exact["storage"],
         exact["n_sel"]),
        (K.KIND_BITMAP_PRUNED | K.GRAD_DENSE, ragged["weight"], ragged["grad"].reshape(-1), ragged["m"], ragged["v"],
         1, ragged["storage"], ragged["n_sel"]),
        (K.KIND_BITMAP_ACTIVE, sparse["weight"], sparse["grad"], sparse["m"], sparse["v"], 6, sparse["storage"],
         sparse["n_sel"]),
    ]
    assert K.whole_tiles_pay(exact["n_sel"], 64 * 64) and not K.whole_tiles_pay(sparse["n_sel"], 30 * 70)
    twice = [
        (K.KIND_BITMAP_PRUNED, both["weight"], both["grad"], both["m"], both["v"], 3, both["storage"], both["n_sel"]),
        (K.KIND_BITMAP_ACTIVE, both["weight"], both_active["grad"], both_active["m"], both_active["v"], 4,
         both["storage"], n_active),
    ]
    assert not K.pointers_aligned(whole) and K.pointers_aligned(whole[1:]) and K.pointers_aligned(twice)
    K.grouped_adamw_triton_(whole, **HYPER, maximize=False)
    K.grouped_adamw_triton_(twice, **HYPER, maximize=False)

    for name, case in (("compact", compact), ("exact", exact), ("ragged", ragged), ("sparse", sparse)):
        want_w, want_m, want_v = expect[name]
        torch.testing.assert_close(case["weight"], want_w.view_as(case["weight"]), rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(case["m"], want_m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(case["v"], want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both["weight"], both_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both_active["m"], both_m, rtol=1e-5, atol=1e-6)
    for case, old in zip(cases, before):
        assert not torch.equal(case["weight"], old)
    assert torch.equal(bufs["weight"][n + 1:], guards[0]) and torch.equal(exact_buf[8 + 64 * 64:], guards[1])
    kept = ragged["weight"].view(-1)[active[:2].to(device)].cpu()
    assert torch.equal(kept.view(torch.int32), torch.tensor([-0.0, float("nan")]).view(torch.int32))
    unselected = active[2:].to(device)
    assert torch.equal(ragged["weight"].view(-1)[unselected], before[2].view(-1)[unselected])


def test_grouped_kernel_refuses_a_short_state_and_writes_nothing():
    gen = torch.Generator().manual_seed(5)
    good = _compact_case(gen, 100)
    bad = _bitmap_case(gen, (8, 16), 0.5, True, False)
    before = [good["weight"].clone(), bad["weight"].clone()]
    items = [
        (triton_adamw.KIND_COMPACT, good["weight"], good["grad"], good["m"], good["v"], 1, None, 100),
        (triton_adamw.KIND_BITMAP_PRUNED, bad["weight"], bad["grad"], bad["m"][:-1], bad["v"], 1, bad["storage"],
         bad["n_sel"]),
    ]
    with pytest.raises(ValueError, match=r"items\[1\]\.exp_avg"):
        triton_adamw.grouped_adamw_triton_(items, **HYPER, maximize=False)
    assert torch.equal(good["weight"], before[0]) and torch.equal(bad["weight"], before[1])
    # the same weight twice with the same kind in one call: two programs would write its tiles
    twice = [items[0], (triton_adamw.KIND_COMPACT, good["weight"], good["grad"].clone(), good["m"].clone(),
                        good["v"].clone(), 1, None, 100)]
    with pytest.raises(ValueError, match=r"items\[1\]\.holder.*pass each weight once"):
        triton_adamw.grouped_adamw_triton_(twice, **HYPER, maximize=False)
    assert torch.equal(good["weight"], before[0])


def _mixed_model(seed, device="cpu"):
    """RESU (bitmap mask), RESU (index mask, s = 0.98), QRESU θ, SPARSE, and plain parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 32), nn.Linear(32, 16),
                          nn.Linear(16, 8)).to(device)
    resu.sparsify_(model)
    resu.prune_(model[0], 0.5)
    resu.prune_(model[1], 0.98)
    resu.prune_(model[2], 0.3)
    resu.prune_(model[3], 0.6)
    resu.enter_resu_(model[0], epsilon=0.1)
    resu.enter_resu_(model[1], epsilon=0.1)
    resu.enter_qresu_(model[2], bits=4, epsilon=0.1)
    return model  # model[3] stays SPARSE, model[4] DENSE


def _train_both(models, opts, gen, steps: int, device) -> None:
    """``steps`` training steps of each model with its optimizer, on the same random batches."""
    for _ in range(steps):
        x = torch.randn(6, 24, generator=gen).to(device)
        for model, opt in zip(models, opts):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()


def _trained(p):
    """What the optimizer steps of ``p``: QRESU's θ vector, or the weight itself."""
    return p._theta if isinstance(p, resu.ResuParameter) and p._theta is not None else p.detach()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("force_kernels", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_resu_adamw_grouped_equals_one_at_a_time(monkeypatch, device, force_kernels, seed):
    if device == "cuda" and not force_kernels:
        pytest.skip("on CUDA the kernels always run")
    if device == "cpu" and force_kernels and torch.cuda.is_available():
        pytest.skip("Triton's interpreter runs the kernels on CPU tensors only on CPU-only machines")
    models = [_mixed_model(seed, device) for _ in range(2)]
    assert models[0][1].weight._encoding is not models[0][0].weight._encoding  # both mask encodings present
    opts = [resu.ResuAdamW(models[0].parameters(), **{k: v for k, v in HYPER.items() if k not in ("beta1", "beta2")}),
            resu.ResuAdamW(models[1].parameters(), lr=HYPER["lr"], eps=HYPER["eps"],
                           weight_decay=HYPER["weight_decay"], foreach=False)]
    launched = []
    if force_kernels:
        if device == "cpu":
            monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
        real = triton_adamw.grouped_adamw_triton_
        monkeypatch.setattr(triton_adamw, "grouped_adamw_triton_", lambda items, **h: (launched.append(len(items)),
                                                                                        real(items, **h)))
    _train_both(models, opts, torch.Generator().manual_seed(seed + 10), 3, device)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        _assert_same(_trained(p).reshape(-1), _trained(q).reshape(-1), "weight")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            _assert_same(opts[0].state[p][key], opts[1].state[q][key], key)
    # with the kernels on, the bitmap RESU weight, the QRESU θ and the SPARSE weight share one grouped call a step
    assert launched == ([3, 3, 3] if force_kernels else [])


def test_a_parameter_listed_twice_is_stepped_twice_as_one_at_a_time(monkeypatch):
    """torch.optim only warns about a parameter listed twice in a group; the grouped path then steps it
    twice, after the launch and in list order, as ``foreach=False`` does (a launch may step a weight's
    slots only once)."""
    if torch.cuda.is_available():
        pytest.skip("Triton's interpreter runs the kernels on CPU tensors only on CPU-only machines")
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    models = [_mixed_model(3) for _ in range(2)]
    opts = []
    for model, foreach in zip(models, (None, False)):
        params = list(model.parameters())
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opts.append(resu.ResuAdamW(params + params[:6], lr=1e-2, weight_decay=0.1, foreach=foreach))
    _train_both(models, opts, torch.Generator().manual_seed(4), 2, "cpu")
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(_trained(p), _trained(q))
        assert torch.equal(opts[0].state[p]["exp_avg"], opts[1].state[q]["exp_avg"])
    assert int(opts[0].state[models[0][0].weight]["step"]) == 4  # listed twice, two steps


def test_the_same_slots_twice_in_one_call_step_in_list_order(monkeypatch):
    """One weight's pruned slots listed twice in one call, once with a weight-shaped gradient and once
    with a compact one (different kinds, so different launches): the second is stepped after the launch,
    in list order, as one job at a time would step them."""
    if torch.cuda.is_available():
        pytest.skip("Triton's interpreter runs the kernels on CPU tensors only on CPU-only machines")
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    gen = torch.Generator().manual_seed(9)
    other, w = _bitmap_case(gen, (20, 30), 0.5, True, False), _bitmap_case(gen, (24, 40), 0.5, True, True)
    compact_grad = torch.randn(w["n_sel"], generator=gen)

    def jobs(o, c):
        def slots(case):
            return A.MaskedSlots(case["weight"], case["storage"], mask_ops.MaskEncoding.BITMAP, case["k"], True)
        return [A.StepJob(slots(o), o["grad"], o["m"], o["v"], 1),
                A.StepJob(slots(c), c["grad"], c["m"], c["v"], 1),  # weight-shaped gradient
                A.StepJob(slots(c), compact_grad, c["m"], c["v"], 2)]

    one_by_one, grouped = [(_clone(other), _clone(w)) for _ in range(2)]
    for job in jobs(*one_by_one):
        A.adamw_step_(job.target, job.grad, job.exp_avg, job.exp_avg_sq, job.step, **HYPER, maximize=False)
    A.adamw_steps_(jobs(*grouped), **HYPER, maximize=False)
    for a, b in zip(one_by_one, grouped):
        for key in ("weight", "m", "v"):
            assert torch.equal(a[key], b[key]), key
