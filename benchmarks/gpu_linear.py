"""Dense vs RESU vs QRESU linear layers on one GPU: forward and training-step time, dequant bandwidth, memory.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_linear.py            # full table
    PYTHONPATH=. python benchmarks/gpu_linear.py --quick    # small shapes, smoke run

Dense baseline: ``nn.Linear`` + ``torch.optim.AdamW(fused=True)``. RESU: the same layer after
``resu.sparsify_`` → ``prune_`` → ``enter_resu_``; QRESU: after ``enter_qresu_`` (4-bit codes); both
trained with ``resu.ResuAdamW``. Everything runs in one process: bf16 autocast, fp32 master weights,
inputs that require grad (as inside a network). Times are medians of CUDA-event timings over several
input sets; memory counts the bytes of weights (or codes, scales and θ), gradients, optimizer states and
mask held after a step (before ``zero_grad``). The dequant+merge bandwidth counts the bytes the kernel
reads and writes, against a device-to-device copy of a tensor the size of its output in the same run.
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


def _graph_time_ms(fn, iters: int, repeats: int = 5) -> float:
    """Device time per call of ``fn``: ``iters`` calls captured in a CUDA graph, replayed (no host overhead)."""
    fn()  # warm up: compile kernels, fill caches
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return _time_ms(graph.replay, 1, warmup=2, repeats=repeats) / iters


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
            tensors += [p._weight, p._mask_storage, p._qdata, p._qscale, p._qzero, p._theta]
            if p._mask_storage is not None and p._mask_storage.is_cuda:
                from resu.compile.triton_bitmap import _OFFSETS_CACHE

                # the bitmap kernels' rank offsets, cached per mask storage
                tensors += [off for ref, _, off in list(_OFFSETS_CACHE.values()) if ref() is p._mask_storage]
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


def build(kind: str, in_f: int, out_f: int, sparsity: float, scheme: str = "per_channel"):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=False, device="cuda")
    if kind == "dense":
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    resu.sparsify_(layer)
    resu.prune_(layer, sparsity)
    if kind == "qresu":
        resu.enter_qresu_(layer, bits=4, scheme=scheme, epsilon=0.1)
    else:
        resu.enter_resu_(layer, epsilon=0.1)
    return layer, resu.ResuAdamW(layer.parameters(), lr=1e-4, weight_decay=0.01)


def dequant_bandwidth(in_f: int, out_f: int, sparsity: float, scheme: str, iters: int) -> tuple[float, float]:
    """(dequant+merge GB/s, device-to-device copy GB/s) for one 4-bit QRESU weight, bytes read + written."""
    torch.cuda.empty_cache()
    layer, _ = build("qresu", in_f, out_f, sparsity, scheme)
    p = layer.weight
    args = p._quant_op_args()
    out = torch.ops.resu.dequant_merge(*args, torch.bfloat16)
    moved = sum(t.numel() * t.element_size() for t in args[:5] if isinstance(t, torch.Tensor))
    moved += out.numel() * out.element_size()
    ms = _graph_time_ms(lambda: torch.ops.resu.dequant_merge(*args, torch.bfloat16), iters)
    src = torch.empty_like(out)
    copy_ms = _graph_time_ms(lambda: out.copy_(src), iters)
    return moved / ms / 1e6, 2 * out.numel() * out.element_size() / copy_ms / 1e6


def measure(kind, in_f, out_f, tokens, sparsity, compiled, iters, profile=False, kernels_only=False, scheme="per_channel"):
    torch.cuda.empty_cache()  # the previous configuration's tensors are gone by now
    torch._dynamo.reset()  # every configuration compiles nn.Linear.forward afresh (no recompile limit)
    layer, opt = build(kind, in_f, out_f, sparsity, scheme)
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
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--scheme", default="per_channel", help="QRESU scale grouping (per_channel|per_tensor|per_group)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="also sum each step's CUDA kernel time (torch.profiler)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each eager step")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    args = ap.parse_args(argv)
    shapes = [(4096, 4096), (11008, 4096)]  # (in_features, out_features): 4096×4096 and 4096×11008 weights
    if args.quick:
        shapes, args.tokens, args.iters = [(512, 256)], 256, 5
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  tokens={args.tokens}  "
          f"bf16 autocast, fp32 master weights, QRESU 4-bit {args.scheme}")
    modes = (False,) if args.no_compile else (False, True)
    configs = []  # (kind, in_f, out_f, sparsity, compiled); dense does not depend on the sparsity
    for in_f, out_f in shapes:
        for compiled in modes:
            configs.append(("dense", in_f, out_f, 0.0, compiled))
            configs += [(kind, in_f, out_f, s, compiled) for s in args.sparsities for kind in ("resu", "qresu")]
    timings = {}
    for kind, in_f, out_f, s, compiled in configs:
        prof = args.profile and not compiled and kind != "dense" and (in_f, out_f) == shapes[0]
        timings[kind, in_f, out_f, s, compiled] = measure(
            kind, in_f, out_f, args.tokens, s, compiled, args.iters, prof, scheme=args.scheme
        )
    bandwidth = {
        (in_f, out_f, s): dequant_bandwidth(in_f, out_f, s, args.scheme, args.iters)
        for in_f, out_f in shapes for s in args.sparsities
    }
    kernel = {}
    if args.kernels:  # after every wall-clock timing: the profiler slows later launches
        kernel = {key: measure(*key[:3], args.tokens, key[3], key[4], args.iters, kernels_only=True, scheme=args.scheme)
                  for key in timings}
    print(f"{'weight (out×in)':>16} {'s':>4} {'mode':>9} {'fwd ms':>8} {'fwd×':>6} {'step ms':>8} {'step×':>6} "
          f"{'mem MiB':>8} {'mem×':>6}" + (f" {'kernel ms':>10} {'×':>6}" if kernel else ""))
    for key in configs:
        kind, in_f, out_f, s, compiled = key
        base_key = ("dense", in_f, out_f, 0.0, compiled)
        (f, st, m), (bf, bst, bm) = timings[key], timings[base_key]
        tag = "/c" if compiled else "/e"
        line = (f"{f'{out_f}×{in_f}':>16} {s:4.1f} {kind + tag:>9} {f:8.3f} {f / bf:6.3f} {st:8.3f} {st / bst:6.3f} "
                f"{m / 2**20:8.1f} {m / bm:6.3f}")
        if kernel:
            line += f" {kernel[key]:10.3f} {kernel[key] / kernel[base_key]:6.3f}"
        print(line, flush=True)
    print(f"{'weight (out×in)':>16} {'s':>4} {'dequant+merge GB/s':>19} {'copy GB/s':>10} {'ratio':>6}")
    for (in_f, out_f, s), (dq, cp) in bandwidth.items():
        print(f"{f'{out_f}×{in_f}':>16} {s:4.1f} {dq:19.0f} {cp:10.0f} {dq / cp:6.3f}")
    print("mode: /e eager, /c torch.compile(fullgraph=True); ratios against dense in the same mode.")
    print("targets (DESIGN.md §7): RESU fwd ≤ 1.02×, step ≤ 0.90×, mem ≤ 0.65× (s=0.5); "
          "QRESU fwd ≤ 1.10×, step ≤ 1.05×, mem ≤ 0.45× (s=0.3); dequant+merge ≥ 0.80× copy bandwidth")


if __name__ == "__main__":
    main()
