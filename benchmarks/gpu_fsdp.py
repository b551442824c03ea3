"""FSDP2 training of a Llama-style decoder: dense AdamW vs RESU vs QRESU, tokens/s and memory per GPU.

Run on a machine with 2 GPUs, from the repository root (one process per GPU, NCCL)::

    PYTHONPATH=. python benchmarks/gpu_fsdp.py                  # ~1B decoder, 2 GPUs
    PYTHONPATH=. python benchmarks/gpu_fsdp.py --smoke          # tiny decoder, 2 CPU processes (gloo)
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/gpu_fsdp.py   # the same, launched by torchrun

The decoder is built from a config in plain PyTorch (RMSNorm, rotary attention through
``scaled_dot_product_attention``, SwiGLU MLP; ~1B: d 2048, 16 layers, SwiGLU 5632, vocab 32000).
Every decoder block and the root are sharded with ``fully_shard`` (:func:`resu.distributed.fully_shard`
for the sparse modes), bf16 parameters and fp32 gradient reduction (``MixedPrecisionPolicy``), fp32
master weights. Dense: ``torch.optim.AdamW(foreach=True)``. RESU / QRESU: every Linear of the blocks
is magnitude-pruned to sparsity s and enters RESU (or QRESU, 4-bit per-group codes), trained with
``resu.ResuAdamW``; embedding, norms and output head stay dense.

Per configuration it reports tokens/s (all ranks) and three memory figures per GPU, as ratios to
dense: *persistent* (the bytes of the rank's stored tensors: weight shards, or codes + scales + θ +
masks, and optimizer states; counted from the tensors, so also on CPU), *held* (allocated between
steps, gradients freed) and *peak* (during a step; both from the CUDA allocator). Prints a table and writes ``gpu_fsdp.json`` to the current folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 32000
    dim: int = 2048
    layers: int = 16
    heads: int = 16
    ffn: int = 5632
    max_seq: int = 4096


ONE_B = DecoderConfig()
SMOKE = DecoderConfig(vocab=256, dim=64, layers=2, heads=4, ffn=128, max_seq=64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's features by position-dependent angles."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm decoder block: causal rotary self-attention, then a SwiGLU MLP."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_norm = RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.gate = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        half = cfg.dim // cfg.heads // 2
        inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        angles = torch.outer(torch.arange(cfg.max_seq, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids)
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- one configuration
def build(cfg: DecoderConfig, mode: str, sparsity: float, device: torch.device, compile_blocks: bool,
          compact_reduce_scatter: bool = True):
    """The decoder in ``mode``, sharded over the default process group, and its optimizer."""
    import resu
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    torch.manual_seed(0)
    with device:
        model = Decoder(cfg)
    if mode != "dense":
        resu.sparsify_(model, filter_fn=lambda name, module: name.startswith("blocks."))
        resu.prune_(model, sparsity, method="magnitude")
        if mode == "resu":
            resu.enter_resu_(model, epsilon=0.1)
        else:
            resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=128, epsilon=0.1)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mode == "dense":
        shard = torch_fully_shard
    else:
        def shard(module, **kwargs):
            return resu.distributed.fully_shard(module, compact_reduce_scatter=compact_reduce_scatter, **kwargs)
    for block in model.blocks:
        shard(block, mp_policy=policy)
        if compile_blocks:
            block.compile()
    shard(model, mp_policy=policy)
    if mode == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    else:
        opt = resu.ResuAdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, opt


def persistent_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes this rank keeps between steps: its shards' stored tensors (weights, or codes, scales, θ and
    mask) and the optimizer states, each storage counted once. Device-independent (also on CPU)."""
    from torch.distributed.tensor import DTensor

    import resu

    tensors = []
    for p in model.parameters():
        local = p._local_tensor if isinstance(p, DTensor) else p
        tensors += list(local._inner().values()) if isinstance(local, resu.ResuParameter) else [local]
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tensors.append(v._local_tensor if isinstance(v, DTensor) else v)
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def run_config(cfg, mode, sparsity, args, device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, opt = build(cfg, mode, sparsity, device, args.compile, not args.dense_reduce_scatter)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    ids = torch.randint(0, cfg.vocab, (args.batch, args.seq + 1), generator=g).to(device)

    def step() -> float:
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    _sync(device)
    held = _allocated(device)  # between steps: weights, states, masks (gradients freed), as the allocator sees it
    stored = persistent_bytes(model, opt)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens = args.batch * args.seq * args.steps * dist.get_world_size()
    if args.profile:
        profile_steps(step, device, f"{mode}_{sparsity}", args.profile)
    result = {
        "mode": mode, "sparsity": sparsity, "params": n_params(model), "tokens_per_s": tokens / elapsed,
        "persistent_bytes_per_gpu": stored, "held_bytes_per_gpu": held, "peak_bytes_per_gpu": _peak(device),
        "loss": loss.item(),
    }
    return result  # the model, optimizer and step closure are freed with this frame


def profile_steps(step, device: torch.device, tag: str, folder: str, steps: int = 2) -> None:
    """``steps`` more steps under torch.profiler; rank 0 writes the kernel table (by device time) and the
    host table (by own CPU time) to ``folder/profile_<tag>.txt`` and prints the step's split. With
    ``RESU_BENCH_PYPROFILE=1``, ``steps`` steps under cProfile first (``folder/pyprofile_<tag>.txt``:
    the Python functions by own and by cumulative time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if os.environ.get("RESU_BENCH_PYPROFILE"):  # the Python functions the host time goes to (rank 0)
        import cProfile
        import io
        import pstats

        _sync(device)
        py = cProfile.Profile()
        py.enable()
        for _ in range(steps):
            step()
        _sync(device)
        py.disable()
        if dist.get_rank() == 0:
            os.makedirs(folder, exist_ok=True)
            text = io.StringIO()
            stats = pstats.Stats(py, stream=text)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(80)
            with open(os.path.join(folder, f"pyprofile_{tag}.txt"), "w") as f:
                f.write(text.getvalue())
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    os.makedirs(folder, exist_ok=True)
    if os.environ.get("RESU_BENCH_TRACE"):  # every rank's timeline, to compare when the ranks reach each collective
        import gzip

        path = os.path.join(folder, f"trace_{tag}_rank{dist.get_rank()}.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            dst.write(src.read())
        os.remove(path)
    if dist.get_rank() != 0:
        return
    events = prof.key_averages()
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps
    with open(os.path.join(folder, f"profile_{tag}.txt"), "w") as f:
        f.write(f"{tag}: {wall_ms:.1f} ms per step under the profiler, device kernels {kernel_us / 1e3:.1f} ms per step\n\n")
        f.write(events.table(sort_by=device_key, row_limit=40))
        f.write("\n\nby own host time\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40))
    print(f"  profile {tag}: {wall_ms:.1f} ms/step, device kernels {kernel_us / 1e3:.1f} ms/step", flush=True)


# ---------------------------------------------------------------------- driver
CONFIGS = (("dense", 0.0), ("resu", 0.5), ("resu", 0.3), ("qresu", 0.3), ("qresu", 0.5))


def worker(rank: int, world: int, port: int, args) -> None:
    if "RANK" not in os.environ:  # mp.spawn: set up the rendezvous torchrun would have
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(1)
    cfg = SMOKE if args.smoke else ONE_B
    results = []
    try:
        for mode, sparsity in CONFIGS:
            if args.modes and mode not in args.modes:
                continue
            results.append(run_config(cfg, mode, sparsity, args, device))
            if dist.get_rank() == 0:
                r = results[-1]
                print(f"  {mode} s={sparsity}: {r['tokens_per_s']:.0f} tok/s, persistent {r['persistent_bytes_per_gpu'] / 2**20:.2f} MiB, "
                      f"held {r['held_bytes_per_gpu'] / 2**30:.2f} GiB, "
                      f"peak {r['peak_bytes_per_gpu'] / 2**30:.2f} GiB", flush=True)
        if dist.get_rank() == 0:
            report(results, cfg, args, world, device)
    finally:
        dist.destroy_process_group()


def report(results: list, cfg: DecoderConfig, args, world: int, device: torch.device) -> None:
    dense = next((r for r in results if r["mode"] == "dense"), None)

    def ratio(r, key):
        return r[key] / dense[key] if dense and dense[key] else float("nan")

    print(f"\nFSDP2, {world} x {device.type}, {results[0]['params'] / 1e9:.2f} B params, batch {args.batch} x seq {args.seq}"
          f" per rank, bf16 params / fp32 reduce{', blocks compiled' if args.compile else ''}")
    print(f"{'mode':<7}{'s':>5}{'tok/s':>12}{'x dense':>9}{'persist MiB/GPU':>17}{'x dense':>9}"
          f"{'held GiB/GPU':>14}{'x dense':>9}{'peak GiB/GPU':>14}{'x dense':>9}")
    for r in results:
        print(f"{r['mode']:<7}{r['sparsity']:>5.1f}{r['tokens_per_s']:>12.0f}{ratio(r, 'tokens_per_s'):>9.3f}"
              f"{r['persistent_bytes_per_gpu'] / 2**20:>17.2f}{ratio(r, 'persistent_bytes_per_gpu'):>9.3f}"
              f"{r['held_bytes_per_gpu'] / 2**30:>14.2f}{ratio(r, 'held_bytes_per_gpu'):>9.3f}"
              f"{r['peak_bytes_per_gpu'] / 2**30:>14.2f}{ratio(r, 'peak_bytes_per_gpu'):>9.3f}")
    for r in results:
        r["tokens_per_s_vs_dense"] = ratio(r, "tokens_per_s")
        r["persistent_vs_dense"] = ratio(r, "persistent_bytes_per_gpu")
        r["held_vs_dense"] = ratio(r, "held_bytes_per_gpu")
        r["peak_vs_dense"] = ratio(r, "peak_bytes_per_gpu")
    out = {"config": dataclasses.asdict(cfg), "world_size": world, "device": device.type, "batch": args.batch,
           "seq": args.seq, "steps": args.steps, "compile": args.compile, "results": results}
    with open("gpu_fsdp.json", "w") as f:
        json.dump(out, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    print("wrote gpu_fsdp.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny decoder, 2 CPU processes with gloo")
    parser.add_argument("--world-size", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per rank and step (default 4; smoke 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; smoke 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    parser.add_argument("--dense-reduce-scatter", action="store_true",
                        help="sparse modes reduce-scatter dense gradients (FSDP2's own), not compact ones")
    parser.add_argument("--profile", metavar="FOLDER", help="profile 2 more steps per mode; tables go to FOLDER")
    parser.add_argument("--modes", nargs="*", choices=("dense", "resu", "qresu"), help="subset of modes to run")
    args = parser.parse_args()
    defaults = dict(batch=2, seq=32, steps=2, warmup=1) if args.smoke else dict(batch=4, seq=2048, steps=10, warmup=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "RANK" in os.environ:  # launched by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world_size, port, args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
