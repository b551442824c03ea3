"""Writing and reading lists of :class:`~resu.training.stats.CycleStats` as JSON and CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import fields
from typing import Iterable, Union

from resu.training.stats import CycleStats

PathLike = Union[str, "os.PathLike[str]"]
_SCALAR_FIELDS = [f.name for f in fields(CycleStats) if f.name != "eval_metrics"]


def _json_safe(value):
    # JSON has no NaN/inf: write null, read back as NaN.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _checked(stats: Iterable[CycleStats]) -> list[CycleStats]:
    stats = list(stats)
    for s in stats:
        if not isinstance(s, CycleStats):
            raise TypeError(f"expected CycleStats objects, got {type(s).__name__}")
    return stats


def save_stats_json(stats: Iterable[CycleStats], path: PathLike) -> None:
    """Write ``stats`` as a JSON list of objects (NaN becomes null)."""
    rows = [_json_safe(s.to_dict()) for s in _checked(stats)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


def load_stats_json(path: PathLike) -> list[CycleStats]:
    """Read what :func:`save_stats_json` wrote."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for row in rows:
        for key in ("mean_consistency", "mean_selection_ratio", "resu_loss", "train_loss"):
            if row.get(key) is None and key in row:
                row[key] = math.nan
        out.append(CycleStats.from_dict(row))
    return out


def save_stats_csv(stats: Iterable[CycleStats], path: PathLike) -> None:
    """Write ``stats`` as CSV: one row per cycle, one column per field, ``eval_<name>`` per metric."""
    stats = _checked(stats)
    metric_names = sorted({k for s in stats for k in s.eval_metrics})
    header = _SCALAR_FIELDS + [f"eval_{m}" for m in metric_names]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for s in stats:
            row = [getattr(s, name) for name in _SCALAR_FIELDS]
            row += [s.eval_metrics.get(m, "") for m in metric_names]
            writer.writerow(row)
