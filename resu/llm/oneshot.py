"""One-shot pruning of SmolLM2 on standard-library text: held-out perplexity per method.

    python -m resu.llm.oneshot --sparsity 0.5 --methods sparsegpt,wanda,magnitude
    python -m resu.llm.oneshot --pattern 2:4 --methods sparsegpt,wanda

Calibration batches come from the train split, perplexity from another split (validation by
default). Methods registered in :data:`resu.prune.registry.PRUNE_METHODS` are calibrated block by
block (:func:`resu.prune.sequential.sequential_prune_`); names only ``resu.prune_`` knows are
calibrated on whole-model forwards, and the table says so.
"""

from __future__ import annotations

import argparse
import copy
import time

import resu
from resu.eval import generate_text, perplexity
from resu.llm.smollm2 import load_smollm2
from resu.llm.stdlib_text import token_batches
from resu.prune.registry import PRUNE_METHODS, PruneSpec
from resu.prune.sequential import sequential_prune_


def _prune(model, method, spec, calib) -> str:
    """Prune ``model`` in place; returns how it was calibrated."""
    resu.sparsify_(model, filter_fn=lambda name, module: name != "lm_head")  # the head is tied to the embedding
    if method in PRUNE_METHODS.names():
        sequential_prune_(model, method, spec, calib)
        return "block by block"
    if spec.pattern is not None:
        if spec.pattern != (2, 4):
            raise SystemExit(f"{method} is not registered for N:M patterns other than 2:4 here")
        resu.prune_(model, 0.5, method="2:4")
        return "whole model (2:4 magnitude)"
    resu.prune_(model, spec.sparsity, method=method, calib=calib if method == "wanda" else None)
    return "whole model"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (overrides --sparsity)")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--eval-split", default="validation", choices=("validation", "test"))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt", default="What is the capital of France?")
    args = parser.parse_args(argv)

    pattern = tuple(int(v) for v in args.pattern.split(":")) if args.pattern else None
    spec = PruneSpec(pattern[0] / pattern[1] if pattern else args.sparsity, pattern=pattern)
    dense, tokenizer = load_smollm2()
    shape = dict(seq_len=args.seq_len, batch_size=args.batch_size)
    calib = token_batches(tokenizer, "train", n_batches=args.calib_batches, **shape)
    held_out = token_batches(tokenizer, args.eval_split, n_batches=args.eval_batches, **shape)
    rows = [("dense", "-", perplexity(dense, held_out), 0.0, generate_text(dense, tokenizer, args.prompt, 12, chat=True))]
    print(f"dense: perplexity {rows[0][2]:.2f}", flush=True)
    for method in args.methods.split(","):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        how = _prune(model, method, spec, calib)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, held_out)
        rows.append((method, how, ppl, seconds, generate_text(model, tokenizer, args.prompt, 12, chat=True)))
        print(f"{method}: perplexity {ppl:.2f} ({how}, {seconds:.0f} s)", flush=True)
        del model
    target = args.pattern or f"{spec.sparsity:.0%}"
    tokens = args.seq_len * args.batch_size
    print(f"\nSmolLM2-135M-Instruct at {target}; calibration {args.calib_batches}×{tokens} train tokens, "
          f"perplexity on {args.eval_batches}×{tokens} {args.eval_split} tokens")
    print("| method | calibration | perplexity | prune time (s) | answer |\n| --- | --- | --- | --- | --- |")
    for method, how, ppl, seconds, answer in rows:
        print(f"| {method} | {how} | {ppl:.2f} | {seconds:.0f} | {answer.strip()!r} |")


if __name__ == "__main__":
    main()
