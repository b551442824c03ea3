"""Whole-model training step: a Llama-style decoder, dense vs RESU vs QRESU vs QLoRA, on one GPU.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/gpu_model.py                      # ~1B, compiled and eager, 2 runs
    PYTHONPATH=. python benchmarks/gpu_model.py --size 7b            # ~7B, batch 1 x 2048
    PYTHONPATH=. python benchmarks/gpu_model.py --size 13b           # ~13B, QRESU only (dense does not fit)
    PYTHONPATH=. python benchmarks/gpu_model.py --compile --modes resu:0.5 --profile resu:0.5
    PYTHONPATH=. python benchmarks/gpu_model.py --smoke              # tiny model on the CPU: the code path

The model is built from a config in plain PyTorch (RMSNorm, rotary attention through
``scaled_dot_product_attention``, SwiGLU MLP, untied embedding and head), fp32 master weights, bf16
autocast, 8192 tokens a step (7B and 13B: 1 x 2048). Each mode is built once per run and timed eager,
then compiled: each decoder block compiled on its own, in place (regional compile, ``block.compile()``).

Modes (``--modes``; ``dense`` is always measured first in the same process, except for 13B):

- ``dense``: every weight trains, ``torch.optim.AdamW(fused=True)``.
- ``resu:S``: the seven linear weights of every block pruned to sparsity S (magnitude, per row) and
  put in RESU (θ trains in the pruned slots), stepped by ``resu.ResuAdamW``.
- ``qresu-pc:S`` / ``qresu-pg128:S``: the same in QRESU, 4-bit codes per channel / per group of 128.
- ``qlora``: torchao's NF4 weight (``to_nf4``/``linear_nf4``) frozen + a rank-16 LoRA adapter
  written here (skipped, with a note, when torchao is not importable).
- any mode with ``+ib`` appended (``dense+ib``, ``qresu-pg128:0.3+ib``): the same optimizers, each
  parameter stepped inside ``backward()`` as soon as its gradient is ready
  (:class:`resu.optim.StepInBackward`), so no step holds every gradient at once; with ``+ckpt``
  (``qresu-pg128:0.3+ckpt+ib``): every block's activations recomputed in backward
  (``torch.utils.checkpoint``, non-reentrant). Ratios stay against plain ``dense``.

In every mode the embedding, the norms and the head are plain parameters trained by
``AdamW(fused=True)``, so the modes differ only in the block linears. A mode's step is forward +
cross-entropy + backward + optimizer step(s) + ``zero_grad``; it is timed with CUDA events after
warm-up steps (which include compilation), and the median of the timed steps is reported. ``peak``
is the peak allocated memory over the timed steps, ``held`` what stays allocated between steps
(weights, optimizer states, masks). Ratios are against dense in the same run and compile setting;
``--runs 2`` repeats everything and reports each run and the spread. Results go to
``gpu_model_<size>.json`` in the current folder (or ``--out``), rewritten after every mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import statistics
import time
import traceback
from typing import Optional

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.optim import StepInBackward


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    ffn: int
    vocab: int
    n_heads: int
    batch: int
    seq: int


SIZES = {
    "smoke": ModelConfig(dim=64, n_layers=2, ffn=160, vocab=256, n_heads=4, batch=2, seq=32),
    "1b": ModelConfig(dim=2048, n_layers=16, ffn=5632, vocab=32000, n_heads=16, batch=4, seq=2048),
    "7b": ModelConfig(dim=4096, n_layers=32, ffn=11008, vocab=32000, n_heads=32, batch=1, seq=2048),
    "13b": ModelConfig(dim=5120, n_layers=40, ffn=13824, vocab=32000, n_heads=40, batch=1, seq=2048),
}
DEFAULT_MODES = {
    "smoke": ["resu:0.5", "qresu-pc:0.3", "qresu-pg128:0.5", "qlora"],
    "1b": ["resu:0.5", "qresu-pc:0.3", "qresu-pc:0.5", "qresu-pg128:0.3", "qresu-pg128:0.5", "qlora"],
    "7b": ["resu:0.5", "qresu-pg128:0.3", "qlora"],
    "13b": ["qresu-pg128:0.3"],
}
BLOCK_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


# ---------------------------------------------------------------------------------------- the model
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    """One pre-norm decoder block: rotary multi-head attention, SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.n_heads = cfg.n_heads
        self.attn_norm = nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.mlp_norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, cfg.ffn, bias=False)
        self.up = nn.Linear(d, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(cfg.seq).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    #: recompute each block's activations in backward (``+ckpt`` modes) instead of keeping them
    checkpoint_blocks = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            if self.checkpoint_blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, self.cos, self.sin, use_reentrant=False)
            else:
                x = block(x, self.cos, self.sin)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------- QLoRA
def _nf4_module():
    """torchao's NF4 tensor module: ``torchao.dtypes.nf4tensor`` (older releases) or its newer home."""
    import importlib

    for name in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("torchao's NF4 tensor (to_nf4/linear_nf4) is not importable (pip install torchao)")


class NF4LoRALinear(nn.Module):
    """A frozen NF4 weight (torchao) plus a trainable rank-``rank`` LoRA adapter: W x + (α/r) B A x."""

    def __init__(self, linear: nn.Linear, rank: int = 16, alpha: float = 32.0) -> None:
        super().__init__()
        nf4 = _nf4_module()
        to_nf4 = nf4.to_nf4
        # looked up once here, not in forward: a failed import is retried on every call, which would put
        # file-system searches (and, compiled, graph breaks) into the baseline's step
        self._linear_nf4 = nf4.linear_nf4
        out_f, in_f = linear.weight.shape
        dev = linear.weight.device
        self.weight = nn.Parameter(to_nf4(linear.weight.detach().to(torch.bfloat16)), requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(rank, in_f, device=dev) / math.sqrt(in_f))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank, device=dev))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._linear_nf4(x.to(torch.bfloat16), self.weight)
        return base + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def torchao_available() -> bool:
    try:
        _nf4_module()
    except Exception:  # noqa: BLE001 - any import failure means: no QLoRA row
        return False
    return True


# ---------------------------------------------------------------------------------------- modes
def parse_mode(mode: str) -> tuple[str, Optional[float], Optional[str]]:
    """``"resu:0.5"`` -> ("resu", 0.5, None); ``"qresu-pg128:0.3"`` -> ("qresu", 0.3, "per_group");
    ``+ib`` / ``+ckpt`` suffixes (stepped in backward, checkpointed blocks) are read by :func:`build`."""
    mode, *extras = mode.split("+")
    if not set(extras) <= {"ib", "ckpt"}:
        raise SystemExit(f"gpu_model: unknown suffix in {'+'.join([mode, *extras])!r}; use +ib and/or +ckpt")
    if mode in ("dense", "qlora"):
        return mode, None, None
    kind, _, s = mode.partition(":")
    schemes = {"resu": None, "qresu-pc": "per_channel", "qresu-pg128": "per_group"}
    if kind not in schemes or not s:
        raise SystemExit(f"gpu_model: unknown mode {mode!r}; use dense, qlora, resu:S, qresu-pc:S or qresu-pg128:S")
    return ("resu" if kind == "resu" else "qresu"), float(s), schemes[kind]


def _is_block_linear(name: str, module: nn.Module) -> bool:
    return name.startswith("blocks.") and name.rsplit(".", 1)[-1] in BLOCK_LINEARS


def build(cfg: ModelConfig, mode: str, device: str, compiled: bool):
    """(model, optimizers) for ``mode``, on ``device``, blocks compiled when ``compiled``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg)
    kind, sparsity, scheme = parse_mode(mode)
    if kind == "dense":
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)]
    elif kind == "qlora":
        for block in model.blocks:
            for name in BLOCK_LINEARS:
                setattr(block, name, NF4LoRALinear(getattr(block, name)))
        if device == "cuda":
            torch.cuda.empty_cache()  # the dense fp32 block weights are gone
        opts = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.01, fused=True)]
    else:
        resu.sparsify_(model, filter_fn=_is_block_linear)
        resu.prune_(model, sparsity)
        if kind == "qresu":
            resu.enter_qresu_(model, bits=4, scheme=scheme, group_size=128, epsilon=0.1)
        else:
            resu.enter_resu_(model, epsilon=0.1)
        sparse = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
        rest = [p for p in model.parameters() if not isinstance(p, resu.ResuParameter)]
        opts = [resu.ResuAdamW(sparse, lr=1e-4, weight_decay=0.01),
                torch.optim.AdamW(rest, lr=1e-4, weight_decay=0.01, fused=True)]
    extras = mode.split("+")[1:]
    model.checkpoint_blocks = "ckpt" in extras
    if "ib" in extras:  # each optimizer's parameters stepped in backward, one optimizer each
        opts = [StepInBackward([p for group in opt.param_groups for p in group["params"]],
                               optimizer_factory=_one_param_factory(opt)) for opt in opts]
    if compiled:
        compile_blocks_(model)
    return model, opts


def _one_param_factory(opt: torch.optim.Optimizer):
    """Builds ``opt``'s kind of optimizer, with every setting of ``opt``'s (one) param group that its
    constructor takes, for a one-parameter list."""
    if len(opt.param_groups) != 1:
        raise ValueError("gpu_model: +ib expects optimizers with one param group")
    accepted = inspect.signature(type(opt).__init__).parameters
    group = opt.param_groups[0]
    settings = {k: v for k, v in group.items() if k != "params" and k in accepted}
    return lambda params: type(opt)(params, **settings)


def make_step(model: nn.Module, opts: list, cfg: ModelConfig, device: str):
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen).to(device) for _ in range(2)]
    state = {"i": 0}

    def step() -> None:
        state["i"] ^= 1
        tokens = batches[state["i"]]
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: str, warmup: int, steps: int) -> list[float]:
    """Per-step milliseconds of ``steps`` back-to-back steps after ``warmup`` ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device != "cuda":
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def compile_blocks_(model: nn.Module) -> None:
    """Regional compile: each decoder block compiled on its own, in place."""
    for block in model.blocks:
        block.compile()


def _timed_row(step, cfg: ModelConfig, device: str, warmup: int, steps: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, device, 0, steps)
    row = {"ms": statistics.median(times), "ms_all": times, "warmup_s": warmup_s}
    if device == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        row["held_bytes"] = torch.cuda.memory_allocated()  # after zero_grad: weights, states, masks
    row["tokens_per_s"] = cfg.batch * cfg.seq / (row["ms"] / 1e3)
    return row


def _error_row(exc: BaseException) -> dict:
    if isinstance(exc, torch.OutOfMemoryError):
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    traceback.print_exc()
    return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def measure(cfg: ModelConfig, mode: str, device: str, settings: list, warmup: int, steps: int) -> dict:
    """Build ``mode`` once and time its steps eager and/or compiled (eager first: compiling is in place).
    Returns ``{compiled: row}``; a row has an ``error`` instead when that measurement failed.

    Compiled code is kept across measurements (no ``torch._dynamo.reset()``): a rebuilt model of the
    same mode hits the cache, so a second run costs no compilation."""
    gc.collect()  # what an earlier mode left in reference cycles must not count in this one's memory
    if device == "cuda":
        torch.cuda.empty_cache()
    rows = {}
    model = opts = step = None
    try:
        t0 = time.perf_counter()
        model, opts = build(cfg, mode, device, compiled=False)
        step = make_step(model, opts, cfg, device)
        build_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the other rows of a long run
        return {compiled: _error_row(exc) for compiled in settings}
    for compiled in sorted(settings):  # False (eager) before True
        try:
            if compiled:
                compile_blocks_(model)
            rows[compiled] = {**_timed_row(step, cfg, device, warmup, steps), "build_s": build_s}
        except Exception as exc:  # noqa: BLE001
            rows[compiled] = _error_row(exc)
    del model, opts, step
    return rows


def profile_mode(cfg: ModelConfig, mode: str, device: str, compiled: bool, tag: str) -> None:
    """torch.profiler over 3 steps of ``mode``: a Chrome trace and a kernel table in the current folder."""
    torch._dynamo.reset()
    model, opts = build(cfg, mode, device, compiled)
    step = make_step(model, opts, cfg, device)
    for _ in range(3):
        step()
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        _sync(device)
    safe = mode.replace(":", "_")
    prof.export_chrome_trace(f"gpu_model_{tag}_{safe}_{'c' if compiled else 'e'}.trace.json")
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    events = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in events)
    # kernels only: an operator (aten::mm) reports the device time of the kernels it launched as its own
    # self time too, so summing every event would count each kernel twice
    kernel = getattr(torch.autograd, "DeviceType", None)
    dev_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events
                 if kernel is None or getattr(e, "device_type", None) == kernel.CUDA)
    summary = (f"profile {mode} ({'compiled' if compiled else 'eager'}), 3 steps: host (CPU self) "
               f"{host_us / 3e3:.1f} ms/step, device (kernels) {dev_us / 3e3:.1f} ms/step\n{table}")
    with open(f"gpu_model_{tag}_{safe}_{'c' if compiled else 'e'}.profile.txt", "w") as fh:
        fh.write(summary)
    print(summary, flush=True)


# ---------------------------------------------------------------------------------------- report
def print_table(results: list[dict], has_dense: bool) -> None:
    print(f"| {'run':>3} | {'mode':<24} | {'comp':<5} | {'step ms':>8} | {'×dense':>7} | {'c/e':>5} | "
          f"{'tok/s':>9} | {'peak GiB':>8} | {'×dense':>7} | {'held GiB':>8} | {'×dense':>7} |")
    print("|" + "|".join("-" * (w + 2) for w in (3, 24, 5, 8, 7, 5, 9, 8, 7, 8, 7)) + "|")
    index = {(r["run"], r["mode"], r["compiled"]): r for r in results}
    for r in results:
        comp = "c" if r["compiled"] else "e"
        if "error" in r or "skipped" in r:
            print(f"| {r['run']:>3} | {r['mode']:<24} | {comp:<5} | {r.get('error') or r.get('skipped')}")
            continue
        dense = index.get((r["run"], "dense", r["compiled"])) if has_dense else None
        dense = dense if dense and "ms" in dense else None
        eager = index.get((r["run"], r["mode"], False))
        ratio = lambda key: (f"{r[key] / dense[key]:7.3f}" if dense and key in r and key in dense else f"{'-':>7}")
        ce = f"{r['ms'] / eager['ms']:5.2f}" if r["compiled"] and eager and "ms" in eager else f"{'-':>5}"
        gib = lambda key: f"{r[key] / 2**30:8.2f}" if key in r else f"{'-':>8}"
        print(f"| {r['run']:>3} | {r['mode']:<24} | {comp:<5} | {r['ms']:8.2f} | {ratio('ms')} | {ce} | "
              f"{r['tokens_per_s']:9.0f} | {gib('peak_bytes')} | {ratio('peak_bytes')} | {gib('held_bytes')} | "
              f"{ratio('held_bytes')} |")
    spread = {}
    for r in results:
        if "ms" in r:
            dense = index.get((r["run"], "dense", r["compiled"]))
            if dense and "ms" in dense and r["mode"] != "dense":
                spread.setdefault((r["mode"], r["compiled"]), []).append(r["ms"] / dense["ms"])
    if any(len(v) > 1 for v in spread.values()):
        print("spread over runs (step ×dense): " + "; ".join(
            f"{m}/{'c' if c else 'e'} {min(v):.3f}–{max(v):.3f}" for (m, c), v in spread.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("1b", "7b", "13b"), default="1b")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 1 warm-up + 2 steps per mode")
    ap.add_argument("--modes", nargs="+", help="modes after dense (default: per size, see the docstring)")
    ap.add_argument("--compile", dest="settings", action="append_const", const=True, help="compiled only")
    ap.add_argument("--eager", dest="settings", action="append_const", const=False, help="eager only")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline (default for 13b)")
    ap.add_argument("--out", help="results file (default gpu_model_<size>.json in the current folder)")
    ap.add_argument("--profile", metavar="MODE", help="also profile MODE (torch.profiler trace + kernel table)")
    args = ap.parse_args(argv)
    size = "smoke" if args.smoke else args.size
    cfg = SIZES[size]
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.warmup, args.steps = 1, 2
    settings = args.settings or [True, False]
    modes = list(args.modes or DEFAULT_MODES[size])
    has_dense = not (args.no_dense or size == "13b")
    if has_dense and "dense" not in modes:
        modes.insert(0, "dense")
    for m in modes:
        parse_mode(m)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    print(f"gpu_model {size}: {cfg}; {cfg.batch * cfg.seq} tokens/step, bf16 autocast, fp32 master weights; "
          f"device {name}; torch {torch.__version__}", flush=True)
    results: list[dict] = []
    out_path = args.out or f"gpu_model_{size}.json"
    for run in range(1, args.runs + 1):
        for mode in modes:
            if parse_mode(mode)[0] == "qlora" and not torchao_available():
                note = "qlora skipped: torchao is not importable (pip install torchao)"
                print(note, flush=True)
                measured = {compiled: {"skipped": note} for compiled in settings}
            else:
                measured = measure(cfg, mode, device, settings, args.warmup, args.steps)
            for compiled in settings:
                row = {"run": run, "mode": mode, "compiled": compiled, **measured[compiled]}
                if "ms" in row:
                    print(f"run {run} {mode} {'compiled' if compiled else 'eager'}: {row['ms']:.2f} ms/step "
                          f"(build {row['build_s']:.1f}s, warm-up {row['warmup_s']:.1f}s)", flush=True)
                elif "error" in row:
                    print(f"run {run} {mode} {'compiled' if compiled else 'eager'}: {row['error']}", flush=True)
                results.append(row)
            with open(out_path, "w") as fh:
                json.dump({"size": size, "config": dataclasses.asdict(cfg), "device": name,
                           "torch": torch.__version__, "results": results}, fh, indent=1)
    results.sort(key=lambda r: (r["run"], not r["compiled"]))  # the table: per run, compiled rows first
    print_table(results, has_dense)
    print(f"results: {out_path}. Targets (issue 12): step ≤ 1.00× dense in every mode; compiled ≤ eager (c/e ≤ 1); "
          "7B QRESU s=0.3 peak ≤ 0.35× dense.")
    if args.profile:
        parse_mode(args.profile)
        profile_mode(cfg, args.profile, device, settings[0], size)


if __name__ == "__main__":
    main()
