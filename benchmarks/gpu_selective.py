"""RESU-Selective step vs plain RESU step vs dense fused AdamW step, as ratios, on one GPU.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_selective.py             # 4096×4096, s = 0.5
    PYTHONPATH=. python benchmarks/gpu_selective.py --quick     # small shape, smoke run
    PYTHONPATH=. python benchmarks/gpu_selective.py --profile   # also the selective step's kernels

Optimizer step: ``opt.step()`` alone on one weight whose gradient is already there (three gradients
are cycled). Dense: ``torch.optim.AdamW(fused=True)`` on a plain 4096×4096 fp32 weight; RESU:
``resu.ResuAdamW`` on the same layer after ``sparsify_`` → ``prune_`` → ``enter_resu_`` (it touches
the n_pruned θ slots only); selective: the same with ``selective=SelectionConfig(strategy=...)``;
``consistency`` finds its two thresholds the default way (on CUDA the exact sample select fused into
the consistency pass), ``consistency-topk`` by two ``torch.topk`` calls (``consistency.select_impl``).
Training step: forward + backward (8192 tokens, bf16 autocast) + optimizer step of that layer.
Times are medians of CUDA-event timings of back-to-back calls; ratios come from one run.
Targets (issue): selective step ≤ 1.05× RESU step; RESU optimizer step ≤ 0.6× dense fused AdamW.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn

import resu
from resu.optim import consistency
from resu.optim.selection_config import SelectionConfig
from resu.tensors.compact_grad import CompactGrad

KINDS = ("dense", "resu", "consistency", "consistency-topk", "random", "magnitude")


def time_ms(fn, device: str, iters: int, warmup: int = 3, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def build(kind: str, shape: tuple[int, int], sparsity: float, device: str):
    """(layer, optimizer) for one of ``KINDS``."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False, device=device)
    if kind == "dense":
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    resu.sparsify_(layer)
    resu.prune_(layer, sparsity)
    resu.enter_resu_(layer, epsilon=0.1)
    selective = None if kind == "resu" else SelectionConfig(strategy=kind.split("-")[0])
    return layer, resu.ResuAdamW(layer.parameters(), lr=1e-4, weight_decay=0.01, selective=selective)


def _grads(weight: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    if isinstance(weight, resu.ResuParameter):
        return [CompactGrad(torch.randn(weight.n_pruned, device=weight.device), weight._mask_storage,
                            weight._encoding, weight.shape) for _ in range(n)]
    return [torch.randn_like(weight) for _ in range(n)]


@contextlib.contextmanager
def thresholds_for(kind: str, device: str):
    """``consistency-topk``: the consistency thresholds by torch.topk while the block runs."""
    saved = dict(consistency.select_impl)
    if kind.endswith("-topk"):
        consistency.select_impl[device] = "topk"
    try:
        yield
    finally:
        consistency.select_impl.clear()
        consistency.select_impl.update(saved)


def optimizer_step_ms(kind, shape, sparsity, device, iters) -> float:
    with thresholds_for(kind, device):
        return _optimizer_step_ms(kind, shape, sparsity, device, iters)


def training_step_ms(kind, shape, sparsity, tokens, device, iters) -> float:
    with thresholds_for(kind, device):
        return _training_step_ms(kind, shape, sparsity, tokens, device, iters)


def _optimizer_step_ms(kind, shape, sparsity, device, iters) -> float:
    layer, opt = build(kind, shape, sparsity, device)
    grads, state = _grads(layer.weight), {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(grads)
        layer.weight.grad = grads[state["i"]]
        opt.step()

    return time_ms(step, device, iters)


def _training_step_ms(kind, shape, sparsity, tokens, device, iters) -> float:
    layer, opt = build(kind, shape, sparsity, device)
    xs = [torch.randn(tokens, shape[1], device=device) for _ in range(2)]
    state = {"i": 0}
    amp = torch.bfloat16

    def step():
        state["i"] ^= 1
        with torch.autocast(device, dtype=amp):
            out = layer(xs[state["i"]])
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_ms(step, device, iters)


def profile_selective(shape, sparsity, device, iters: int = 10) -> None:
    """Kernel-time breakdown of one consistency-strategy step (CUDA only)."""
    layer, opt = build("consistency", shape, sparsity, device)
    grads = _grads(layer.weight)
    for g in grads:
        layer.weight.grad = g
        opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            layer.weight.grad = grads[i % len(grads)]
            opt.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024×1024, fewer iterations")
    ap.add_argument("--profile", action="store_true", help="print the selective step's kernel breakdown")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    shape = (1024, 1024) if args.quick or args.device == "cpu" else (4096, 4096)
    tokens = 1024 if args.quick or args.device == "cpu" else 8192
    iters = 5 if args.device == "cpu" else (20 if args.quick else 50)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"

    opt_ms = {k: optimizer_step_ms(k, shape, args.sparsity, args.device, iters) for k in KINDS}
    train_ms = {k: training_step_ms(k, shape, args.sparsity, tokens, args.device, iters) for k in KINDS}

    print(f"\nRESU-Selective on {name}: weight {shape[0]}×{shape[1]}, s = {args.sparsity}, "
          f"training step with {tokens} tokens, bf16 autocast; torch {torch.__version__}")
    print(f"| {'step':<11} | {'optimizer':<36} | {'ms':>8} | {'vs RESU':>8} | {'vs dense':>8} |")
    print(f"|{'-' * 13}|{'-' * 38}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for title, table in (("optimizer", opt_ms), ("training", train_ms)):
        for k in KINDS:
            label = {"dense": "AdamW(fused=True), dense", "resu": "ResuAdamW"}.get(k, f"ResuAdamW selective {k}")
            print(f"| {title:<11} | {label:<36} | {table[k]:>8.3f} | {table[k] / table['resu']:>7.2f}× "
                  f"| {table[k] / table['dense']:>7.2f}× |")
    print(f"targets: selective (consistency) optimizer step {opt_ms['consistency'] / opt_ms['resu']:.2f}× RESU "
          f"(≤ 1.05×), training step {train_ms['consistency'] / train_ms['resu']:.2f}× RESU (≤ 1.10×, DESIGN §7); "
          f"RESU optimizer step {opt_ms['resu'] / opt_ms['dense']:.2f}× dense fused AdamW (≤ 0.60×)")
    if args.profile and args.device == "cuda":
        profile_selective(shape, args.sparsity, args.device)


if __name__ == "__main__":
    main()
