"""``plot_cycles``: a PNG of sparsity, phase losses, eval accuracy and resurrections per RESU cycle (needs matplotlib)."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Union

_INSTALL_HINT = "resu.plot_cycles needs matplotlib; install the demo extra: pip install -e '.[demo]'"


def _rows(stats: Iterable[Any]) -> list[dict]:
    rows = []
    for s in stats:
        rows.append(s.to_dict() if hasattr(s, "to_dict") else dict(s))
    if not rows:
        raise ValueError("plot_cycles: `stats` is empty; pass the CycleStats of at least one cycle")
    return rows


def _finite(values):
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def plot_cycles(stats: Iterable[Any], path: Union[str, "os.PathLike[str]"], *, title: str = "RESU cycles") -> None:
    """Write a PNG of :func:`cycles_figure` to ``path`` (see there for what each panel shows)."""
    cycles_figure(stats, title=title).savefig(os.fspath(path), format="png", dpi=100)


def cycles_figure(stats: Iterable[Any], *, title: str = "RESU cycles"):
    """A matplotlib ``Figure`` with one panel per quantity, each saying *when* in the cycle it is measured.

    A cycle runs TRAIN → PRUNE → (STABILIZE) → RESU → COMMIT, and its numbers come from different
    moments of it: the train loss is the mean over the TRAIN phase, *before* that cycle prunes, while
    sparsity, resurrections and the ``accuracy`` eval metric are read *after* the commit. Drawn on one
    axis, cycle 0's low dense train loss would sit next to the accuracy of the freshly pruned model, so
    the panels are: sparsity after the commit; the two phases' mean losses; eval accuracy after the
    commit (when the stats carry it); weights resurrected by the commit.

    ``stats`` is a list of :class:`~resu.training.stats.CycleStats` (or their ``to_dict()`` dicts).
    matplotlib is imported here only, with its non-interactive Agg canvas (no display needed).
    """
    rows = _rows(stats)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    cycles = [r["cycle"] for r in rows]
    accuracy = [r.get("eval_metrics", {}).get("accuracy") for r in rows]
    has_accuracy = any(a is not None for a in accuracy)
    fig = Figure(figsize=(14.5 if has_accuracy else 11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, 4 if has_accuracy else 3))
    ax_sp, ax_loss, ax_res = axes[0], axes[1], axes[-1]

    ax_sp.plot(cycles, [r["target_sparsity"] for r in rows], "o--", label="target")
    ax_sp.plot(cycles, [r["actual_sparsity"] for r in rows], "s-", label="actual, after the commit")
    ax_sp.set(title="sparsity at the end of each cycle", xlabel="cycle", ylabel="fraction of weights pruned", ylim=(-0.02, 1.02))
    ax_sp.legend()

    ax_loss.plot(cycles, _finite([r["train_loss"] for r in rows]), "o-", label="TRAIN phase (before the cycle prunes)")
    ax_loss.plot(cycles, _finite([r.get("resu_loss", float("nan")) for r in rows]), "s-", label="RESU θ phase (after the cycle prunes)")
    ax_loss.set(title="training loss, mean over each phase", xlabel="cycle", ylabel="loss")
    ax_loss.legend()

    if has_accuracy:
        ax_acc = axes[2]
        ax_acc.plot(cycles, _finite(accuracy), "^-", color="tab:green", label="eval accuracy")
        ax_acc.set(title="eval accuracy after the commit", xlabel="cycle", ylabel="accuracy", ylim=(-0.02, 1.02))

    ax_res.bar(cycles, [r["n_resurrected"] for r in rows], color="tab:orange")
    ax_res.set(title="weights resurrected by the commit", xlabel="cycle", ylabel="count")
    for ax in axes:
        ax.set_xticks(cycles)
    fig.suptitle(title)
    return fig
