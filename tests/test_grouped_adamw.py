"""The grouped AdamW step (many weights, one launch) gives the per-weight results.

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
    gen = torch.Generator().manual_seed(seed + 10)
    for _ in range(3):
        x = torch.randn(6, 24, generator=gen).to(device)
        for model, opt in zip(models, opts):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        a = p._theta if isinstance(p, resu.ResuParameter) and p._theta is not None else p.detach()
        b = q._theta if isinstance(q, resu.ResuParameter) and q._theta is not None else q.detach()
        _assert_same(a.reshape(-1), b.reshape(-1), "weight")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            _assert_same(opts[0].state[p][key], opts[1].state[q][key], key)
    # with the kernels on, the bitmap RESU weight, the QRESU θ and the SPARSE weight share one launch a step
    assert launched == ([3, 3, 3] if force_kernels else [])
