"""``plot_cycles``: a PNG of sparsity, loss/accuracy and resurrections per RESU cycle (needs matplotlib)."""

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
    """Write a PNG to ``path`` with three panels per cycle: target and actual sparsity; train and RESU
    loss (with the ``accuracy`` eval metric on a second axis when present); resurrected weights.

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
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_sp, ax_loss, ax_res = fig.subplots(1, 3)

    ax_sp.plot(cycles, [r["target_sparsity"] for r in rows], "o--", label="target")
    ax_sp.plot(cycles, [r["actual_sparsity"] for r in rows], "s-", label="actual")
    ax_sp.set(title="sparsity", xlabel="cycle", ylim=(-0.02, 1.02))
    ax_sp.legend()

    ax_loss.plot(cycles, _finite([r["train_loss"] for r in rows]), "o-", label="train loss")
    ax_loss.plot(cycles, _finite([r.get("resu_loss", float("nan")) for r in rows]), "s-", label="RESU loss")
    ax_loss.set(title="loss / accuracy", xlabel="cycle", ylabel="loss")
    handles, labels = ax_loss.get_legend_handles_labels()
    accuracy = [r.get("eval_metrics", {}).get("accuracy") for r in rows]
    if any(a is not None for a in accuracy):
        ax_acc = ax_loss.twinx()
        ax_acc.plot(cycles, _finite(accuracy), "^-", color="tab:green", label="eval accuracy")
        ax_acc.set(ylabel="accuracy")
        more_h, more_l = ax_acc.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax_loss.legend(handles, labels)

    ax_res.bar(cycles, [r["n_resurrected"] for r in rows], color="tab:orange")
    ax_res.set(title="resurrected weights", xlabel="cycle", ylabel="count")
    for ax in (ax_sp, ax_loss, ax_res):
        ax.set_xticks(cycles)
    fig.suptitle(title)
    fig.savefig(os.fspath(path), format="png", dpi=100)
