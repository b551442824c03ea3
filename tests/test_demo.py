"""The digits demo (``python -m resu.demo``) runs end to end and prints a sensible table."""

import math
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from resu import demo  # noqa: E402

PHASES = ("dense", "pruned 70%", "after RESU", "after commit")


def _table_rows(out: str) -> list[list[str]]:
    """The data rows of the printed table, as lists of stripped cells."""
    lines = [line for line in out.splitlines() if " | " in line]
    assert lines, f"no table in the output:\n{out}"
    assert lines[0].split(" | ")[0].strip() == "phase"
    return [[cell.strip() for cell in line.split(" | ")] for line in lines[1:]]


def test_quick_run_prints_the_four_phases(capsys):
    returned = demo.main(["--quick"])
    out = capsys.readouterr().out
    rows = _table_rows(out)

    assert len(rows) == len(PHASES), out
    for row, phase in zip(rows, PHASES):
        assert len(row) == 4, row
        assert row[0].startswith(phase), (row, phase)

    accuracies = [float(row[1]) for row in rows]
    for acc in accuracies:
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0, accuracies
    assert accuracies[0] > 0.5, f"dense accuracy too low: {accuracies[0]}"

    sparsities = [row[2] for row in rows]
    assert sparsities[0] == "0.00"
    assert sparsities[1] == "0.70" and sparsities[3] == "0.70", sparsities

    assert rows[0][3] == rows[1][3] == rows[2][3] == "-"
    assert int(rows[3][3]) >= 0
    assert "total time:" in out

    # The returned rows are the printed ones.
    assert [round(acc, 4) for _, acc, _, _ in returned] == accuracies
    assert returned[3][3] == int(rows[3][3])


def test_quick_run_is_deterministic(capsys):
    first = demo.main(["--quick", "--epochs", "2", "--resu-epochs", "1", "--seed", "3"])
    second = demo.main(["--quick", "--epochs", "2", "--resu-epochs", "1", "--seed", "3"])
    capsys.readouterr()
    assert first == second


def test_missing_demo_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[demo\]'"):
        demo.main(["--quick"])


def test_bad_sparsity_is_rejected(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--sparsity", "1.5"])
    assert "--sparsity" in capsys.readouterr().err
