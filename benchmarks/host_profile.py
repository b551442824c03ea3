"""Where the host time of one RESU training step goes (cProfile), eager and compiled, on one GPU.

    PYTHONPATH=. python benchmarks/host_profile.py [--in-features 4096 --out-features 4096 --tokens 8192]

Prints per-step host time with a device sync after each step, then the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn as nn

import resu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    for kind, compiled in (("dense", False), ("resu", False), ("resu", True)):
        torch.manual_seed(0)
        layer = nn.Linear(args.in_features, args.out_features, bias=False, device="cuda")
        if kind == "dense":
            opt = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=True)
        else:
            resu.sparsify_(layer)
            resu.prune_(layer, 0.5)
            resu.enter_resu_(layer, epsilon=0.1)
            opt = resu.ResuAdamW(layer.parameters(), lr=1e-4)
        run = torch.compile(layer, fullgraph=True) if compiled else layer
        x = torch.randn(args.tokens, args.in_features, device="cuda", requires_grad=True)
        g = torch.randn(args.tokens, args.out_features, device="cuda", dtype=torch.bfloat16)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = run(x)
            out.backward(g)
            opt.step()
            opt.zero_grad()
            x.grad = None

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        print(f"=== {kind} {'compiled' if compiled else 'eager'}: {(time.perf_counter() - t0) * 1e3 / args.steps:.3f} ms/step (queued)")
        # host time of each phase, the GPU queue drained before each (launch overhead only)
        phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        for _ in range(args.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = run(x)
            phases["forward"] += time.perf_counter() - t
            torch.cuda.synchronize()
            t = time.perf_counter()
            out.backward(g)
            phases["backward"] += time.perf_counter() - t
            torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step()
            opt.zero_grad()
            x.grad = None
            phases["optimizer"] += time.perf_counter() - t
        print("host ms per phase (launch only): " + ", ".join(f"{k} {v * 1e3 / args.steps:.3f}" for k, v in phases.items()))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
