"""Host (Python) time of one ResuAdamW step over many weights, on the CPU, CUDA path with launches stubbed.

    PYTHONPATH=. python benchmarks/host_optim.py [--count 50 --shape 64 64 --sparsity 0.5]

The optimizer takes the path it takes on CUDA (``registry.use_triton`` forced on) but every Triton
kernel launch is replaced by a no-op, so what is timed is the Python work around the launches:
state bookkeeping, checks, argument tables. Rows: grouped (one launch per param group, the default)
and ``foreach=False`` (one launch per weight), for RESU (bitmap masks) and QRESU weights. A real
launch adds roughly 10–30 µs of host time each on top (measure that on the GPU with gpu_optim.py).
Writes ``host_optim.json`` to the current folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

import resu
from resu.compile import registry
from resu.compile import triton_adamw
from resu.tensors.compact_grad import CompactGrad


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing and counts the launch."""

    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.launches += 1

        return launch


def build(kind: str, count: int, shape, sparsity: float, foreach):
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(shape[1], shape[0], bias=False) for _ in range(count))
    resu.sparsify_(layers)
    resu.prune_(layers, sparsity)
    if kind == "qresu":
        resu.enter_qresu_(layers, bits=4, scheme="per_group", group_size=32, epsilon=0.1)
    else:
        resu.enter_resu_(layers, epsilon=0.1)
    weights = [layer.weight for layer in layers]
    for w in weights:
        w.grad = CompactGrad(torch.randn(w.n_pruned), w._mask_storage, w._encoding, w.shape)
    return weights, resu.ResuAdamW(weights, lr=1e-4, foreach=foreach)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--shape", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    registry.use_triton = lambda *tensors: True
    for name in ("_grouped_kernel", "_bitmap_kernel", "_compact_kernel", "_indexed_kernel"):
        setattr(triton_adamw, name, _NoLaunch())
    rows = []
    for kind in ("resu", "qresu"):
        for foreach in (None, False):
            _, opt = build(kind, args.count, args.shape, args.sparsity, foreach)
            for _ in range(5):
                opt.step()
            _NoLaunch.launches = 0
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                opt.step()
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append({"kind": kind, "grouped": foreach is None, "count": args.count,
                         "host_ms": statistics.median(times), "launches_per_step": _NoLaunch.launches / args.steps})
    print(f"ResuAdamW.step host time, {args.count} weights of {args.shape[0]}×{args.shape[1]}, s = {args.sparsity} "
          f"(CUDA path, launches stubbed), torch {torch.__version__}")
    print(f"| {'weights':<6} | {'path':<22} | {'host ms/step':>12} | {'µs/weight':>9} | {'launches':>8} |")
    print(f"|{'-' * 8}|{'-' * 24}|{'-' * 14}|{'-' * 11}|{'-' * 10}|")
    for r in rows:
        path = "grouped (default)" if r["grouped"] else "foreach=False"
        print(f"| {r['kind']:<6} | {path:<22} | {r['host_ms']:12.3f} | {r['host_ms'] * 1e3 / r['count']:9.1f} | "
              f"{r['launches_per_step']:8.0f} |")
    with open("host_optim.json", "w") as fh:
        json.dump({"torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
