"""The README's "Pruning and recovering a pretrained LLM" code runs as written, on a tiny Llama.

The section's code blocks are executed in order in one namespace; only ``resu.llm.load_smollm2`` is
replaced (by a 2-block Llama built from a config and a character tokenizer), so every other call —
token batches from the standard library, pruning, recovery, adoption, perplexity, generation — is the
README's own.
"""

import math
import pathlib
import re

import pytest

pytest.importorskip("transformers")

import resu  # noqa: E402
import resu.llm  # noqa: E402
from tests.tiny_lm import CharTokenizer, tiny_llama  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Pruning and recovering a pretrained LLM"


def _section_code() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "the README lost its LLM section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def _weights(model):
    return [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]


def _sparsity(model) -> float:
    ws = _weights(model)
    return sum(p.n_pruned for p in ws) / sum(p.numel() for p in ws)


def test_readme_llm_section_runs_on_a_tiny_llama(monkeypatch, capsys):
    blocks = _section_code()
    assert len(blocks) >= 4
    monkeypatch.setattr(resu.llm, "load_smollm2", lambda: (tiny_llama(), CharTokenizer()))
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102  (the README's code is the test subject)
    printed = capsys.readouterr().out

    # the dense model is never touched by the pruning of its copies
    assert not _weights(ns["model"])
    for name in ("wanda", "sparsegpt", "semi"):
        assert not _weights(ns[name]) if name == "sparsegpt" else all(p.mode is resu.ResuMode.SPARSE for p in _weights(ns[name]))
    assert _sparsity(ns["semi"]) == pytest.approx(0.5)
    for p in _weights(ns["semi"]):  # 2 of every 4 consecutive input weights pruned
        groups = p.active_mask.reshape(p.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())

    # equal steps, same sparsity, and the recipe moved the mask
    report = ns["report"]
    assert report.theta_steps + report.finetune_steps == 32
    assert report.sparsity == pytest.approx(0.5, abs=0.01) and _sparsity(ns["wanda"]) == pytest.approx(0.5, abs=0.01)
    assert _sparsity(ns["baseline"]) == pytest.approx(0.5, abs=0.01)

    # the adopted checkpoint has exactly the zeros SparseGPT left, as its mask
    sparsegpt = dict(ns["sparsegpt"].named_parameters())
    adopted = [(name, p) for name, p in ns["adopted"].named_parameters() if isinstance(p, resu.ResuParameter)]
    assert adopted
    for name, p in adopted:
        zeros = sparsegpt[name] == 0
        assert p.mode is resu.ResuMode.SPARSE
        assert p.n_pruned == int(zeros.sum())
        assert bool((p.effective_weight()[zeros] == 0).all())
    assert _sparsity(ns["adopted"]) == pytest.approx(0.5, abs=0.01)

    numbers = [float(x) for x in re.findall(r"\d+\.\d+", printed)]
    assert numbers and all(math.isfinite(x) for x in numbers)
