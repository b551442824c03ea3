"""RESU vs dense nn.Linear on one GPU: forward time, training-step time and persistent memory as ratios.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_resu_linear.py            # full table
    PYTHONPATH=. python benchmarks/gpu_resu_linear.py --quick    # small shapes, smoke run

Dense baseline: ``nn.Linear`` + ``torch.optim.AdamW(fused=True)``; RESU: the same layer after
``resu.sparsify_`` → ``prune_`` → ``enter_resu_`` with ``resu.ResuAdamW``. Both run in the same
process, bf16 autocast, fp32 master weights, inputs that require grad (as inside a network).
Times are medians of CUDA-event timings over several input sets; memory counts the bytes of
weights, gradients, optimizer states and mask held after a step (before ``zero_grad``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn as nn

import resu
from resu.tensors.compact_grad import CompactGrad


def _time_ms(fn, iters: int, warmup: int = 3, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back calls (CUDA events).

    Calls are queued back to back, as in a training loop, so host-side overhead only shows when the
    host cannot keep ahead of the GPU.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _kernel_ms(fn, iters: int) -> float:
    """Sum of GPU kernel time per call (torch.profiler): the device work alone, no host overhead."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for evt in prof.key_averages():
        total_us += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return total_us / 1e3 / iters


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def persistent_bytes(layer: nn.Linear, opt: torch.optim.Optimizer) -> int:
    """Weights + grads + optimizer states + mask: every tensor the training state keeps alive."""
    tensors = []
    for p in layer.parameters():
        if isinstance(p, resu.ResuParameter):
            tensors += [p._weight, p._mask_storage]
            if p._mask_storage is not None and p._mask_storage.is_cuda:
                from resu.compile.triton_bitmap import cached_offsets_of

                tensors += cached_offsets_of(p._mask_storage)  # the bitmap kernels' rank offsets
        else:
            tensors.append(p)
        g = p.grad
        if isinstance(g, CompactGrad):
            tensors += [g.values, g.mask_storage]
        else:
            tensors.append(g)
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                tensors.append(v)
    return _tensor_bytes(tensors)


def build(kind: str, in_f: int, out_f: int, sparsity: float):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=False, device="cuda")
    if kind == "dense":
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    resu.sparsify_(layer)
    resu.prune_(layer, sparsity)
    resu.enter_resu_(layer, epsilon=0.1)
    return layer, resu.ResuAdamW(layer.parameters(), lr=1e-4, weight_decay=0.01)


def measure(kind, in_f, out_f, tokens, sparsity, compiled, iters, profile=False, kernels_only=False):
    torch.cuda.empty_cache()  # the previous configuration's tensors are gone by now
    layer, opt = build(kind, in_f, out_f, sparsity)
    fwd_module = torch.compile(layer, fullgraph=True) if compiled else layer
    xs = [torch.randn(tokens, in_f, device="cuda", requires_grad=True) for _ in range(3)]
    gs = [torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    state = {"i": 0}

    def forward():
        i = state["i"] = (state["i"] + 1) % 3
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fwd_module(xs[i])

    def step():
        i = state["i"] = (state["i"] + 1) % 3
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd_module(xs[i])
        out.backward(gs[i])
        opt.step()
        opt.zero_grad(set_to_none=True)
        xs[i].grad = None

    if kernels_only:
        # A separate pass: once torch.profiler has run, kernel launches in the process get slower,
        # so it must not precede any wall-clock timing.
        return _kernel_ms(step, iters)
    fwd_ms = _time_ms(forward, iters)
    step_ms = _time_ms(step, iters)
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"--- {kind} step kernels ({'compiled' if compiled else 'eager'}, {out_f}×{in_f}), 5 steps ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    # one more step, stopping before zero_grad, to count what training keeps alive
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fwd_module(xs[0])
    out.backward(gs[0])
    opt.step()
    mem = persistent_bytes(layer, opt)
    return fwd_ms, step_ms, mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each step")
    args = ap.parse_args(argv)
    shapes = [(4096, 4096), (11008, 4096)]  # (in_features, out_features): 4096×4096 and 4096×11008 weights
    if args.quick:
        shapes, args.tokens, args.iters = [(512, 256)], 256, 5
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  tokens={args.tokens}  "
          f"sparsity={args.sparsity}  bf16 autocast, fp32 master weights")
    header = (f"{'weight (out×in)':>16} {'mode':>9} {'fwd ms':>8} {'fwd×':>6} {'step ms':>8} {'step×':>6} "
              f"{'mem MiB':>8} {'mem×':>6} {'step GPU-kernel ms':>18} {'×':>6}")
    print(header)
    configs = [(in_f, out_f, compiled) for in_f, out_f in shapes for compiled in (False, True)]
    timings = {}
    for in_f, out_f, compiled in configs:
        prof = args.profile and not compiled and (in_f, out_f) == shapes[0]
        for kind in ("dense", "resu"):
            timings[kind, in_f, out_f, compiled] = measure(
                kind, in_f, out_f, args.tokens, args.sparsity, compiled, args.iters, prof
            )
    kernel = {
        key: measure(key[0], key[1], key[2], args.tokens, args.sparsity, key[3], args.iters, kernels_only=True)
        for key in timings
    }
    for in_f, out_f, compiled in configs:
        base = (*timings["dense", in_f, out_f, compiled], kernel["dense", in_f, out_f, compiled])
        for name in ("dense", "resu"):
            f, s_, m = timings[name, in_f, out_f, compiled]
            h = kernel[name, in_f, out_f, compiled]
            tag = "/c" if compiled else "/e"
            print(f"{f'{out_f}×{in_f}':>16} {name + tag:>9} {f:8.3f} {f / base[0]:6.3f} "
                  f"{s_:8.3f} {s_ / base[1]:6.3f} {m / 2**20:8.1f} {m / base[2]:6.3f} {h:18.3f} {h / base[3]:6.3f}", flush=True)
    print("mode: /e eager, /c torch.compile(fullgraph=True). fwd/step: back-to-back CUDA-event timing;")
    print("step GPU-kernel: summed CUDA kernel time per step from torch.profiler (device work without host overhead).")
    print("targets (DESIGN.md §7): RESU forward ≤ 1.02×, step ≤ 0.90×, memory ≤ 0.65× of dense")


if __name__ == "__main__":
    main()
