"""The digits demo (``python -m resu.demo``) runs end to end, prints its comparison table and saves the plot."""

import math
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from resu import demo  # noqa: E402

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
