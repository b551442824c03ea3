"""Optimizer steps alone: ResuAdamW vs fused dense AdamW, grouped vs one weight at a time, selective vs plain.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/gpu_optim.py            # 4096×11008 at s = 0.5; 50 weights of 2048×2048
    PYTHONPATH=. python benchmarks/gpu_optim.py --smoke    # tiny shapes on the CPU: the code path

Each row times ``opt.step()`` alone, the gradients already in place (three sets, cycled):

- one weight (``--shape``, default 4096×11008, sparsity ``--sparsity``): ``torch.optim.AdamW(fused=True)``
  on the dense weight; ``resu.ResuAdamW`` on the RESU weight (θ in the pruned slots, bitmap mask) and
  on the QRESU weight (θ vector, 4-bit per-group codes); the RESU-Selective consistency step.
- the RESU-Selective step with its two thresholds by ``torch.topk`` (``selective``) and by the exact
  sample select fused into the consistency pass (``selective-radix``, the CUDA default; the row keeps
  its name from the radix select it replaced);
- the two threshold selects alone by top-k and by ``kth_largest_key`` (the sample select with its own
  pass over the keys; ``select-radix``), and the selection without the AdamW pass (keys, EMA /
  consistency pass, both thresholds) for each ``consistency.select_impl`` ("topk", "key", "fused"),
  next to the consistency pass alone, the floor every way pays.
- many weights (``--count`` weights of ``--many-shape``): the same optimizers over all of them, and
  ResuAdamW with ``foreach=False`` (one launch per weight instead of one per param group).

``ms``: median CUDA-event time of back-to-back steps (what a training loop sees); ``host ms``: Python
time of one ``step()`` call with the device queue drained first (launch overhead). Results go to
``gpu_optim.json`` in the current folder. Targets (issue 12): ResuAdamW step ≤ 0.60× fused AdamW at
s = 0.5; selective consistency step ≤ 1.10× plain RESU step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time

import torch
import torch.nn as nn

import resu
from resu.optim import consistency
from resu.optim.selection_config import SelectionConfig
from resu.tensors.compact_grad import CompactGrad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_selective import time_ms  # noqa: E402  (one timing loop for the optimizer benchmarks)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()




def host_ms(fn, device: str, iters: int) -> float:
    """Median Python time of one call, the device queue drained before each (launch overhead only)."""
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def build(kind: str, shape: tuple[int, int], count: int, sparsity: float, device: str):
    """``count`` layers of ``shape`` (out, in) and their optimizer, for one of the row kinds."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(shape[1], shape[0], bias=False, device=device) for _ in range(count))
    if kind == "dense":
        return layers, torch.optim.AdamW(layers.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    resu.sparsify_(layers)
    resu.prune_(layers, sparsity)
    if kind == "qresu":
        resu.enter_qresu_(layers, bits=4, scheme="per_group", group_size=128, epsilon=0.1)
    else:
        resu.enter_resu_(layers, epsilon=0.1)
    selective = SelectionConfig(strategy="consistency") if kind.startswith("selective") else None
    foreach = False if kind == "resu-1by1" else None
    return layers, resu.ResuAdamW(layers.parameters(), lr=1e-4, weight_decay=0.01, selective=selective,
                                  foreach=foreach)


def _grads(weights: list[torch.Tensor], n: int = 3) -> list[list[torch.Tensor]]:
    out = []
    for _ in range(n):
        grads = []
        for w in weights:
            if isinstance(w, resu.ResuParameter):
                grads.append(CompactGrad(torch.randn(w.n_pruned, device=w.device), w._mask_storage, w._encoding,
                                         w.shape))
            else:
                grads.append(torch.randn_like(w))
        out.append(grads)
    return out


def optimizer_row(kind, shape, count, sparsity, device, iters) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
    saved = dict(consistency.select_impl)
    if kind.startswith("selective"):  # how the two thresholds are found (the same selection every way)
        consistency.select_impl[device] = SELECT_OF[kind]
    layers, opt = build(kind, shape, count, sparsity, device)
    weights = [layer.weight for layer in layers]
    grads, state = _grads(weights), {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(grads)
        for w, g in zip(weights, grads[state["i"]]):
            w.grad = g
        opt.step()

    row = {"kind": kind, "shape": list(shape), "count": count, "sparsity": sparsity,
           "ms": time_ms(step, device, iters), "host_ms": host_ms(step, device, iters)}
    del layers, opt, grads
    consistency.select_impl.clear()
    consistency.select_impl.update(saved)
    return row


SELECT_OF = {"selective": "topk", "selective-radix": "fused"}


def select_rows(n: int, device: str, iters: int) -> list[dict]:
    """The two exact thresholds of one consistency step (k = n/2 on every key, k = n/5 on the 30%
    left eligible), by top-k (``kth_largest``) and by the sample select (``kth_largest_key``)."""
    keys = consistency.selection_keys(torch.randn(n, device=device))
    screened = keys.clone()
    screened[torch.rand(n, device=device) < 0.7] = -1
    rows = []
    for name, fn in (("topk", consistency.kth_largest), ("radix", consistency.kth_largest_key)):
        ms = time_ms(lambda: (fn(keys, n // 2), fn(screened, n // 5)), device, iters)
        rows.append({"kind": f"select-{name}", "n": n, "ms": ms})
    return rows


def selection_rows(n: int, device: str, iters: int) -> list[dict]:
    """The selection of one consistency step over n θ slots without the AdamW pass, for each
    ``select_impl`` (``selection-<impl>``: keys, EMA/consistency pass, both thresholds), and the
    consistency pass alone (``pass``: the floor every way pays)."""
    config = SelectionConfig(strategy="consistency")
    grad = torch.randn(n, device=device)
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    rows = []
    saved = dict(consistency.select_impl)
    for impl in consistency.SELECT_IMPLS:
        consistency.select_impl[device] = impl
        ms = time_ms(lambda: consistency.consistency_selection(grad, m, v, config, False), device, iters)
        rows.append({"kind": f"selection-{impl}", "n": n, "ms": ms})
    consistency.select_impl.clear()
    consistency.select_impl.update(saved)
    for row in rows:
        row["same_as_topk"] = selection_agrees(row["kind"][len("selection-"):], n, device)
    keys = consistency.selection_keys(grad)
    screen = consistency.kth_largest(keys, config.screen_count(n))
    work = keys.clone()
    ms = time_ms(lambda: consistency.consistency_pass_(grad, m, v, work, screen, beta=config.beta, delta=config.delta,
                                                        tau=config.tau_stable, maximize=False), device, iters)
    rows.append({"kind": "pass", "n": n, "ms": ms})
    return rows


def selection_agrees(impl: str, n: int, device: str, steps: int = 3) -> bool:
    """Whether ``select_impl`` ``impl`` selects the same slots as "topk" (and counts the same C sum and
    selection size) over ``steps`` consistency steps from the same EMAs, on fresh random gradients."""
    config = SelectionConfig(strategy="consistency")
    g = torch.Generator(device=device).manual_seed(n)
    grads = [torch.randn(n, device=device, generator=g) * torch.rand(n, device=device, generator=g) for _ in range(steps)]
    saved = dict(consistency.select_impl)
    picks = {}
    for name in ("topk", impl):
        consistency.select_impl[device] = name
        m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
        picks[name] = []
        for grad in grads:
            keys, threshold, sum_c, count = consistency.consistency_selection(grad, m, v, config, False)
            picks[name].append((keys >= threshold, sum_c, count))
    consistency.select_impl.clear()
    consistency.select_impl.update(saved)
    return all(
        torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.allclose(a[1], b[1], rtol=1e-4)
        for a, b in zip(picks["topk"], picks[impl])
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], help="one weight, out in")
    ap.add_argument("--many-shape", type=int, nargs=2, default=[2048, 2048])
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.shape, args.many_shape, args.iters = [96, 64], [32, 32], min(args.iters, 5)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    print(f"gpu_optim on {name}, torch {torch.__version__}, s = {args.sparsity}", flush=True)
    rows = []
    plan = [(k, tuple(args.shape), 1) for k in ("dense", "resu", "resu-1by1", "qresu", *SELECT_OF)]
    plan += [(k, tuple(args.many_shape), args.count) for k in ("dense", "resu", "resu-1by1", "qresu")]
    for kind, shape, count in plan:
        row = optimizer_row(kind, shape, count, args.sparsity, device, args.iters)
        rows.append(row)
        print(f"  {kind} {shape[0]}×{shape[1]} ×{count}: {row['ms']:.3f} ms, host {row['host_ms']:.3f} ms", flush=True)
        with open("gpu_optim.json", "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=1)

    def ref(row, kind):
        return next(r for r in rows if r["kind"] == kind and r["count"] == row["count"])

    print(f"| {'weights':<16} | {'optimizer':<32} | {'ms':>8} | {'×dense':>7} | {'×RESU':>6} | {'host ms':>8} |")
    print(f"|{'-' * 18}|{'-' * 34}|{'-' * 10}|{'-' * 9}|{'-' * 8}|{'-' * 10}|")
    labels = {"dense": "AdamW(fused=True), dense", "resu": "ResuAdamW RESU (grouped)",
              "resu-1by1": "ResuAdamW RESU (foreach=False)", "qresu": "ResuAdamW QRESU pg128 (grouped)",
              "selective": "ResuAdamW RESU selective, top-k", "selective-radix": "ResuAdamW RESU selective, fused"}
    for r in rows:
        what = f"{r['count']}×{r['shape'][0]}×{r['shape'][1]}"
        print(f"| {what:<16} | {labels[r['kind']]:<32} | {r['ms']:8.3f} | {r['ms'] / ref(r, 'dense')['ms']:7.3f} | "
              f"{r['ms'] / ref(r, 'resu')['ms']:6.2f} | {r['host_ms']:8.3f} |")
    n_pruned = round(args.sparsity * args.shape[0] * args.shape[1])
    selects = select_rows(n_pruned, device, args.iters)
    for r in selects:
        how = "top-k" if r["kind"] == "select-topk" else "sample select (kth_largest_key)"
        print(f"threshold select ({how}), two selects over {r['n']} keys: {r['ms']:.3f} ms")
    selections = selection_rows(n_pruned, device, args.iters)
    for r in selections:
        what = "consistency pass alone" if r["kind"] == "pass" else \
            f"selection, select_impl {r['kind'][10:]!r} (keys, consistency pass, both thresholds)"
        same = f", the same slots as top-k: {r['same_as_topk']}" if "same_as_topk" in r else ""
        print(f"{what}, {r['n']} θ slots: {r['ms']:.3f} ms{same}")
    with open("gpu_optim.json", "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows, "selects": selects,
                   "selections": selections}, fh, indent=1)
    one = [r for r in rows if r["count"] == 1]
    dense, plain = ref(one[0], "dense"), ref(one[0], "resu")
    sel = min((r for r in one if r["kind"].startswith("selective")), key=lambda r: r["ms"])
    print(f"targets: ResuAdamW RESU step {plain['ms'] / dense['ms']:.3f}× fused AdamW (≤ 0.60×); selective "
          f"consistency step ({sel['kind']}) {sel['ms'] / plain['ms']:.3f}× plain RESU step (≤ 1.10×). "
          "Results: gpu_optim.json")


if __name__ == "__main__":
    main()
