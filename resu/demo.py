"""End-to-end RESU demo: dense training, pruning, resurrection, commit — on scikit-learn's digits.

Run it with ``python -m resu.demo`` (needs the demo extras: ``pip install -e '.[demo]'``).

An MLP 64 → 128 → 64 → 10 (ReLU) is trained on the bundled 8×8 digits data set (no download), then:

1. **dense** — :func:`resu.sparsify_` turns the Linear weights into DENSE ResuParameters, trained with
   :class:`resu.ResuAdamW`;
2. **pruned** — :func:`resu.prune_` removes ``--sparsity`` of every weight (row scope), with no
   fine-tuning afterwards;
3. **after RESU** — :func:`resu.enter_resu_` puts a small trainable θ in every pruned slot while the
   active weights stay frozen; only θ is trained (biases are left out of that optimizer too), and the
   accuracy is measured with θ in place;
4. **after commit** — :func:`resu.exit_resu_` with ``commit=True`` keeps θ, then a magnitude re-prune
   back to ``--sparsity`` decides which slots stay: a θ that grew larger than an old active weight of
   its row takes that weight's place. "θ slots kept" counts the slots that were pruned before RESU
   and are active after the commit.

The "sparsity" column is what the forward sees, weighted by parameter count over the Linear weights:
in RESU mode the mask still prunes the same slots, but they hold θ, so the forward is dense.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

_INSTALL_HINT = "the demo needs scikit-learn and tqdm; install them with: pip install -e '.[demo]'"

# Settings of a full run and of --quick (for tests).
DENSE_EPOCHS, RESU_EPOCHS = 20, 8
QUICK_DENSE_EPOCHS, QUICK_RESU_EPOCHS = 6, 3
BATCH_SIZE = 64
DENSE_LR, RESU_LR = 3e-3, 3e-3
WEIGHT_DECAY = 1e-2
EPSILON = 0.05
CALIB_BATCHES = 4
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def _require_demo_deps():
    """``(load_digits, train_test_split, StandardScaler, tqdm)``, or an ImportError saying what to install."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(f"resu.demo: {_INSTALL_HINT} ({exc})") from exc
    return load_digits, train_test_split, StandardScaler, tqdm


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resu.demo",
        description="Dense training, pruning, RESU and commit of a small MLP on scikit-learn's digits.",
    )
    parser.add_argument("--sparsity", type=float, default=0.7, help="fraction of every Linear weight to prune (default 0.7)")
    parser.add_argument("--epochs", type=int, default=None, help=f"dense training epochs (default {DENSE_EPOCHS}, {QUICK_DENSE_EPOCHS} with --quick)")
    parser.add_argument("--resu-epochs", type=int, default=None, help=f"RESU epochs (default {RESU_EPOCHS}, {QUICK_RESU_EPOCHS} with --quick)")
    parser.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude", help="pruning criterion (default magnitude)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and θ (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny epoch counts, for tests and smoke runs")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.epochs is None:
        args.epochs = QUICK_DENSE_EPOCHS if args.quick else DENSE_EPOCHS
    if args.resu_epochs is None:
        args.resu_epochs = QUICK_RESU_EPOCHS if args.quick else RESU_EPOCHS
    if args.epochs < 0 or args.resu_epochs < 0:
        parser.error("--epochs and --resu-epochs must be >= 0")
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


def _weights(model: nn.Module) -> list[ResuParameter]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def _train(model, opt, x, y, epochs: int, gen: torch.Generator, bar) -> None:
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def _sparsity(model) -> float:
    """Fraction of Linear weight entries the forward does not use (pruned and not holding θ)."""
    weights = _weights(model)
    unused = sum(p.n_pruned for p in weights if p.mode is ResuMode.SPARSE)
    return unused / sum(p.numel() for p in weights)


def _format_table(rows) -> str:
    header = ("phase", "test accuracy", "sparsity", "θ slots kept")
    cells = [header] + [(name, f"{acc:.4f}", f"{sp:.2f}", "-" if kept is None else str(kept)) for name, acc, sp, kept in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(cells[0]), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[tuple[str, float, float, Optional[int]]]:
    """Run the demo and print its table; returns the rows ``(phase, accuracy, sparsity, θ slots kept)``."""
    args = _parse_args(argv)
    load_digits, train_test_split, StandardScaler, tqdm = _require_demo_deps()
    t0 = time.perf_counter()
    show_bars = sys.stdout.isatty()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = _load_data(load_digits, train_test_split, StandardScaler)
    model = _mlp()
    rows = []
    pct = f"{args.sparsity:.0%}"

    # 1. dense training, the weights already being ResuParameters in DENSE mode
    resu.sparsify_(model)
    opt = resu.ResuAdamW(model.parameters(), lr=DENSE_LR, weight_decay=WEIGHT_DECAY)
    with tqdm(total=args.epochs, desc="dense", unit="epoch", disable=not show_bars, leave=False) as bar:
        _train(model, opt, x_tr, y_tr, args.epochs, gen, bar)
    rows.append(("dense", _accuracy(model, x_te, y_te), _sparsity(model), None))

    # 2. one-shot pruning, no fine-tuning
    calib = None
    if args.method == "wanda":
        calib = [x_tr[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for i in range(CALIB_BATCHES)]
    resu.prune_(model, args.sparsity, method=args.method, scope="row", calib=calib)
    rows.append((f"pruned {pct} ({args.method})", _accuracy(model, x_te, y_te), _sparsity(model), None))
    pruned_before = [~p.active_mask for p in _weights(model)]

    # 3. RESU: θ in the pruned slots is the only thing trained
    resu.enter_resu_(model, epsilon=EPSILON, generator=gen)
    resu_opt = resu.ResuAdamW(_weights(model), lr=RESU_LR, weight_decay=WEIGHT_DECAY)
    with tqdm(total=args.resu_epochs, desc="RESU", unit="epoch", disable=not show_bars, leave=False) as bar:
        _train(model, resu_opt, x_tr, y_tr, args.resu_epochs, gen, bar)
    rows.append(("after RESU (θ trained)", _accuracy(model, x_te, y_te), _sparsity(model), None))

    # 4. commit θ, then re-prune by magnitude so the largest of old weights and θ stay active
    resu.exit_resu_(model, commit=True)
    resu.prune_(model, args.sparsity, method="magnitude", scope="row")
    kept = sum(int((before & p.active_mask).sum()) for before, p in zip(pruned_before, _weights(model)))
    rows.append((f"after commit (re-pruned to {pct})", _accuracy(model, x_te, y_te), _sparsity(model), kept))

    elapsed = time.perf_counter() - t0
    n_weights = sum(p.numel() for p in _weights(model))
    print(
        f"MLP 64-128-64-10 on digits ({len(x_tr)} train / {len(x_te)} test), {args.epochs} dense + "
        f"{args.resu_epochs} RESU epochs, seed {args.seed}, {n_weights} Linear weights"
    )
    print(_format_table(rows))
    print(
        f"sparsity: Linear weight entries the forward leaves out; after RESU the {pct} pruned slots hold θ "
        "(the mask is unchanged)"
    )
    print(f"total time: {elapsed:.1f} s")
    return rows


if __name__ == "__main__":
    main()
