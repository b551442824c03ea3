"""CycleStats export to JSON and CSV, and resu.plot_cycles."""

import csv
import json
import math
import random
import sys

import pytest

import resu
from resu.training.export import load_stats_json, save_stats_csv, save_stats_json
from resu.training.stats import CycleStats


def _random_stats(n=4, seed=0):
    rng = random.Random(seed)
    out = []
    for c in range(n):
        out.append(
            CycleStats(
                cycle=c, target_sparsity=rng.random(), actual_sparsity=rng.random(), train_loss=rng.random() * 3,
                train_steps=rng.randint(1, 99), resu_steps=rng.randint(1, 99), resu_updates=rng.randint(1, 10**6),
                mean_consistency=math.nan if c % 2 else rng.random(), mean_selection_ratio=rng.random(),
                resurrection_budget=rng.random() / 5, n_resurrected=rng.randint(0, 999), n_active_kept=rng.randint(0, 999),
                resurrection_rate=rng.random(), duration_seconds=rng.random(), resu_loss=rng.random(),
                mask_churn=rng.random(), stabilize_swaps=rng.randint(0, 50), pruned=bool(c % 2),
                eval_metrics={"accuracy": rng.random()} if c else {},
            )
        )
    return out


def test_json_round_trip(tmp_path):
    stats = _random_stats()
    path = tmp_path / "stats.json"
    save_stats_json(stats, path)
    raw = json.loads(path.read_text())  # strict JSON: NaN was written as null
    assert raw[1]["mean_consistency"] is None
    back = load_stats_json(path)
    for a, b in zip(stats, back):
        da, db = a.to_dict(), b.to_dict()
        for key in da:
            if isinstance(da[key], float) and math.isnan(da[key]):
                assert math.isnan(db[key])
            else:
                assert da[key] == db[key], key


def test_csv_has_one_row_per_cycle_and_metric_columns(tmp_path):
    stats = _random_stats(seed=1)
    path = tmp_path / "stats.csv"
    save_stats_csv(stats, path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(stats)
    for s, row in zip(stats, rows):
        assert int(row["cycle"]) == s.cycle
        assert float(row["actual_sparsity"]) == s.actual_sparsity
        assert int(row["n_resurrected"]) == s.n_resurrected
        assert row["eval_accuracy"] == (str(s.eval_metrics["accuracy"]) if s.eval_metrics else "")
    assert "eval_metrics" not in rows[0]


def test_export_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="CycleStats"):
        save_stats_json([{"cycle": 0}], tmp_path / "x.json")


def test_plot_cycles_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "cycles.png"
    resu.plot_cycles(_random_stats(5, seed=2), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    resu.plot_cycles([s.to_dict() for s in _random_stats(1)], tmp_path / "one.png")  # dicts work too
    with pytest.raises(ValueError, match="empty"):
        resu.plot_cycles([], tmp_path / "none.png")


def test_plot_cycles_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"\.\[demo\]"):
        resu.plot_cycles(_random_stats(2), tmp_path / "x.png")
