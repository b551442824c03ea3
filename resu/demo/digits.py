"""RESU demo on scikit-learn's digits: RESU training cycles against one-shot pruning + fine-tuning.

Run it with ``python -m resu.demo --digits`` (needs the demo extras: ``pip install -e '.[demo]'``).

An MLP 64 → 128 → 64 → 10 (ReLU) is trained densely on the bundled 8×8 digits data set (no
download). Then, for every target sparsity (70% and 90% by default) and every seed, two runs start
from that same dense model and get the same budget of steps:

- **one-shot + fine-tune**: :func:`resu.prune_` by magnitude to the target at once, then plain
  fine-tuning of the active weights with :class:`resu.ResuAdamW`;
- **RESU cycles**: :class:`resu.training.RESUTrainer` on three quarters of the budget — the first
  cycle trains, prunes to the target (Wanda) and refines the mask without training (DSNoT); every
  cycle trains θ in the pruned slots while active weights stay frozen (RESU) and commits with the
  amnesty tournament, and the next cycle trains the committed mask. The last quarter fine-tunes
  after the last commit. DSNoT rounds count against the budget although they train nothing.

The table gives the test accuracy (mean ± std over the seeds) at the final sparsity, and how many
weights the commits resurrected. A PNG of the RESU cycles of the first seed at the highest sparsity
is saved (``--plot``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.training.config import RESUConfig
from resu.training.cycle import RESUTrainer

_INSTALL_HINT = "the demo needs scikit-learn and tqdm; install them with: pip install -e '.[demo]'"

# Settings of a full run and of --quick (for tests).
DENSE_STEPS, BUDGET_STEPS, CYCLES = 300, 400, 3
CYCLE_SHARE = 0.75  # of the budget for the RESU cycles; the rest fine-tunes after the last commit
QUICK_DENSE_STEPS, QUICK_BUDGET_STEPS, QUICK_CYCLES = 60, 60, 2
BATCH_SIZE = 64
LR, RESU_LR = 3e-3, 3e-3
WEIGHT_DECAY = 1e-2
EPSILON = 0.1
SPLIT_SEED = 0
TEST_FRACTION = 0.25
DEFAULT_PLOT = "resu_demo_cycles.png"


def _require_demo_deps():
    """``(load_digits, train_test_split, StandardScaler)``, or an ImportError saying what to install."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
        import tqdm  # noqa: F401  (progress bars of the training phases)
    except ImportError as exc:
        raise ImportError(f"resu.demo: {_INSTALL_HINT} ({exc})") from exc
    return load_digits, train_test_split, StandardScaler


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resu.demo --digits",
        description="RESU training cycles vs one-shot magnitude pruning + fine-tuning of an MLP on scikit-learn's digits.",
    )
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.7, 0.9], help="target sparsities (default 0.7 0.9)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    parser.add_argument("--dense-steps", type=int, default=None, help=f"dense training steps (default {DENSE_STEPS}, {QUICK_DENSE_STEPS} with --quick)")
    parser.add_argument("--budget", type=int, default=None, help=f"steps after dense training, for both methods (default {BUDGET_STEPS}, {QUICK_BUDGET_STEPS} with --quick)")
    parser.add_argument("--cycles", type=int, default=None, help=f"RESU cycles within the budget (default {CYCLES}, {QUICK_CYCLES} with --quick)")
    parser.add_argument("--plot", default=DEFAULT_PLOT, help=f"PNG of the RESU cycles (default {DEFAULT_PLOT}; '' for none)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts, for tests and smoke runs")
    args = parser.parse_args(argv)
    for s in args.sparsity:
        if not 0.0 < s < 1.0:
            parser.error(f"--sparsity values must be in (0, 1), got {s}")
    args.dense_steps = args.dense_steps if args.dense_steps is not None else (QUICK_DENSE_STEPS if args.quick else DENSE_STEPS)
    args.budget = args.budget if args.budget is not None else (QUICK_BUDGET_STEPS if args.quick else BUDGET_STEPS)
    args.cycles = args.cycles if args.cycles is not None else (QUICK_CYCLES if args.quick else CYCLES)
    if args.seeds < 1 or args.cycles < 1 or args.dense_steps < 0 or args.budget < args.cycles:
        parser.error("--seeds and --cycles must be >= 1, --dense-steps >= 0, and --budget >= --cycles")
    return args


def _load_data(load_digits, train_test_split, StandardScaler):
    """Standardized digits as float tensors ``(x_train, y_train, x_test, y_test)``, split with seed 0."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class _ShuffledBatches:
    """Mini-batches of a fixed data set, reshuffled every pass with the global torch RNG."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        order = torch.randperm(len(self.x))
        for start in range(0, len(self.x), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            yield self.x[idx], self.y[idx]


def train_step(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _train(model, opt, batches, steps: int) -> None:
    model.train()
    it = iter(batches)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            batch = next(it)
        loss = train_step(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def _sparsity(model) -> float:
    weights = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    return sum(p.n_pruned for p in weights) / sum(p.numel() for p in weights)


def _one_shot(dense, sparsity, batches, steps, x_te, y_te) -> dict:
    model = copy.deepcopy(dense)
    resu.prune_(model, sparsity, method="magnitude")
    _train(model, resu.ResuAdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY), batches, steps)
    return {"accuracy": _accuracy(model, x_te, y_te), "sparsity": _sparsity(model), "resurrected": 0}


def _cycle_steps(args) -> int:
    return max(1, int(args.budget * CYCLE_SHARE) // args.cycles)


def _resu_cycles(dense, sparsity, batches, args, seed, x_te, y_te, show_bars) -> tuple[dict, list]:
    model = copy.deepcopy(dense)
    config = RESUConfig(
        target_sparsity=sparsity,
        num_cycles=args.cycles,
        sparsity_schedule="constant",
        steps_per_cycle=_cycle_steps(args),
        pruning_method="wanda",
        resu_lr=RESU_LR,
        resu_epsilon=EPSILON,
        weight_decay=WEIGHT_DECAY,
        seed=seed,
        progress_bar=show_bars,
    )
    opt = resu.ResuAdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    trainer = RESUTrainer(model, config, opt, train_step, eval_fn=lambda m: {"accuracy": _accuracy(m, x_te, y_te)})
    stats = trainer.train(batches)
    # The last cycle ends with a commit; the rest of the budget fine-tunes the committed mask.
    _train(model, opt, batches, args.budget - args.cycles * _cycle_steps(args))
    summary = trainer.get_training_summary()
    result = {"accuracy": _accuracy(model, x_te, y_te), "sparsity": _sparsity(model), "resurrected": summary["total_resurrected"]}
    return result, stats


def _mean_std(values) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def _format_table(rows) -> str:
    header = ("target", "method", "test accuracy", "final sparsity", "resurrected")
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the demo, print its table and save the plot.

    Returns ``{"dense": [accuracy per seed], (sparsity, method): [result dict per seed], "plot": path or None}``
    with method ``"one-shot"`` or ``"resu"``.
    """
    args = _parse_args(argv)
    load_digits, train_test_split, StandardScaler = _require_demo_deps()
    t0 = time.perf_counter()
    show_bars = sys.stderr.isatty()
    x_tr, y_tr, x_te, y_te = _load_data(load_digits, train_test_split, StandardScaler)
    batches = _ShuffledBatches(x_tr, y_tr)
    results: dict = {"dense": []}
    plot_stats = None
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = resu.sparsify_(_mlp())
        _train(dense, resu.ResuAdamW(dense.parameters(), lr=LR, weight_decay=WEIGHT_DECAY), batches, args.dense_steps)
        results["dense"].append(_accuracy(dense, x_te, y_te))
        for sparsity in args.sparsity:
            torch.manual_seed(1000 + seed)
            results.setdefault((sparsity, "one-shot"), []).append(_one_shot(dense, sparsity, batches, args.budget, x_te, y_te))
            torch.manual_seed(1000 + seed)
            outcome, stats = _resu_cycles(dense, sparsity, batches, args, seed, x_te, y_te, show_bars)
            results.setdefault((sparsity, "resu"), []).append(outcome)
            if seed == 0 and sparsity == max(args.sparsity):
                plot_stats = stats

    rows = [("0%", "dense", _mean_std(results["dense"]), "0.00", "-")]
    labels = {"one-shot": "one-shot + fine-tune", "resu": "RESU cycles"}
    for sparsity in args.sparsity:
        for method in ("one-shot", "resu"):
            runs = results[(sparsity, method)]
            resurrected = "-" if method == "one-shot" else f"{statistics.fmean(r['resurrected'] for r in runs):.0f}"
            rows.append((f"{sparsity:.0%}", labels[method], _mean_std([r["accuracy"] for r in runs]),
                         f"{statistics.fmean(r['sparsity'] for r in runs):.2f}", resurrected))
    results["plot"] = None
    if args.plot:
        resu.plot_cycles(plot_stats, args.plot, title=f"RESU cycles to {max(args.sparsity):.0%} sparsity (seed 0)")
        results["plot"] = args.plot

    print(
        f"MLP 64-128-64-10 on digits ({len(x_tr)} train / {len(x_te)} test), {args.seeds} seeds; "
        f"{args.dense_steps} dense steps, then {args.budget} steps per method "
        f"(RESU: {args.cycles} cycles of {_cycle_steps(args)}, then {args.budget - args.cycles * _cycle_steps(args)} fine-tuning)"
    )
    print(_format_table(rows))
    print("test accuracy: mean ± std over the seeds; resurrected: weights the amnesty commits brought back (mean)")
    if results["plot"]:
        print(f"plot of the RESU cycles: {results['plot']}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
