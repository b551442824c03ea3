"""The digits demo (``python -m resu.demo --digits``) runs end to end, prints its comparison table and saves the plot."""

import math
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from resu.demo import digits as demo  # noqa: E402
import resu.demo  # noqa: E402

METHODS = ("one-shot + fine-tune", "RESU cycles")


def _table_rows(out: str) -> list[list[str]]:
    """The data rows of the printed table, as lists of stripped cells."""
    lines = [line for line in out.splitlines() if " | " in line]
    assert lines, f"no table in the output:\n{out}"
    assert lines[0].split(" | ")[0].strip() == "target"
    return [[cell.strip() for cell in line.split(" | ")] for line in lines[1:]]


def _mean_std(cell: str) -> tuple[float, float]:
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def test_quick_run_compares_both_methods_at_both_sparsities(capsys, tmp_path):
    plot = tmp_path / "cycles.png"
    returned = demo.main(["--quick", "--plot", str(plot)])
    out = capsys.readouterr().out
    rows = _table_rows(out)

    assert [r[0] for r in rows] == ["0%", "70%", "70%", "90%", "90%"], out
    assert rows[0][1] == "dense" and [r[1] for r in rows[1:]] == list(METHODS) * 2
    for row in rows:
        mean, std = _mean_std(row[2])
        assert 0.0 <= mean <= 1.0 and math.isfinite(std) and std >= 0
    assert _mean_std(rows[0][2])[0] > 0.5, "dense accuracy too low"
    assert [r[3] for r in rows] == ["0.00", "0.70", "0.70", "0.90", "0.90"]
    assert rows[1][4] == rows[3][4] == "-" and int(rows[2][4]) > 0 and int(rows[4][4]) > 0

    # three seeds behind every mean, and the returned numbers are the printed ones
    assert len(returned["dense"]) == 3
    for target, row in ((0.7, rows[2]), (0.9, rows[4])):
        runs = returned[(target, "resu")]
        assert len(runs) == 3
        assert f"{sum(r['accuracy'] for r in runs) / 3:.4f}" == row[2].split(" ± ")[0]
    assert returned["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "total time:" in out


def test_quick_run_is_deterministic(capsys):
    argv = ["--quick", "--seeds", "1", "--sparsity", "0.8", "--plot", "", "--budget", "20", "--dense-steps", "10"]
    first = demo.main(argv)
    second = demo.main(argv)
    capsys.readouterr()
    assert first == second and first["plot"] is None


def test_missing_demo_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[demo\]'"):
        demo.main(["--quick"])


@pytest.mark.parametrize("argv, flag", [(["--sparsity", "1.5"], "--sparsity"), (["--seeds", "0"], "--seeds")])
def test_bad_arguments_are_rejected(capsys, argv, flag):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert flag in capsys.readouterr().err


def test_digits_flag_of_the_demo_command_runs_the_digits_demo(capsys):
    argv = ["--quick", "--seeds", "1", "--sparsity", "0.8", "--plot", "", "--budget", "20", "--dense-steps", "10"]
    via_flag = resu.demo.main(["--digits"] + argv)
    capsys.readouterr()
    assert via_flag == demo.main(argv)


def test_cycle_plot_separates_what_is_measured_before_and_after_pruning():
    """Cycle 0's train loss is a mean over the dense TRAIN phase, the accuracy is read after the commit:
    they sit on separately titled panels, each line labelled with the moment it measures."""
    from resu.plotting import cycles_figure
    from resu.training.stats import CycleStats

    stats = [
        CycleStats(cycle=c, target_sparsity=0.9, actual_sparsity=0.9, train_loss=0.01 + c, train_steps=5, resu_steps=5,
                   resu_updates=10, mean_consistency=math.nan, mean_selection_ratio=1.0, resurrection_budget=0.1,
                   n_resurrected=7, n_active_kept=0, resurrection_rate=0.1, duration_seconds=1.0, resu_loss=0.5,
                   eval_metrics={"accuracy": 0.45 + 0.1 * c})
        for c in range(2)
    ]
    fig = cycles_figure(stats)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss_ax = next(ax for t, ax in by_title.items() if "loss" in t)
    acc_ax = next(ax for t, ax in by_title.items() if "accuracy" in t)
    assert loss_ax is not acc_ax and "after the commit" in acc_ax.get_title()
    labels = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines()}
    train_label = next(label for label in labels if label.startswith("TRAIN"))
    assert "before the cycle prunes" in train_label and labels[train_label] == [0.01, 1.01]
    assert [list(line.get_ydata()) for line in acc_ax.get_lines()] == [[0.45, 0.55]]
    assert loss_ax.get_ylabel() == "loss" and acc_ax.get_ylabel() == "accuracy"
    assert all(ax.get_xlabel() == "cycle" for ax in fig.axes)
