"""Arguments of ``python -m resu.demo``: the SmolLM2 demo by default, the digits demo with ``--digits``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence



def _parse_lm_args(argv: Sequence[str]) -> argparse.Namespace:
    from resu.demo.lm import LMDemoSettings

    d = LMDemoSettings()
    parser = argparse.ArgumentParser(
        prog="python -m resu.demo",
        description="Prune SmolLM2-135M-Instruct with Wanda, then recover it by sparse fine-tuning and by the RESU "
        "recipe at equal steps; prints test perplexities and the model's answer to a question. "
        "`python -m resu.demo --digits [--help]` runs the MLP-on-digits demo instead.",
    )
    parser.add_argument("--sparsity", type=float, default=d.sparsity, help=f"Wanda sparsity (default {d.sparsity})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per recovery method (default {d.steps})")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per batch (default {d.batch_size})")
    parser.add_argument("--calib-batches", type=int, default=d.calib_batches, help=f"calibration batches (default {d.calib_batches})")
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches, help=f"test batches per perplexity (default {d.eval_batches})")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"length of the answers (default {d.max_new_tokens})")
    parser.add_argument("--prompt", default=d.prompt, help=f"the question (default {d.prompt!r})")
    args = parser.parse_args(argv)
    try:
        args.settings = LMDemoSettings(
            sparsity=args.sparsity, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
            calib_batches=args.calib_batches, eval_batches=args.eval_batches, max_new_tokens=args.max_new_tokens,
            prompt=args.prompt,
        )
    except ValueError as exc:
        parser.error(str(exc).replace("LMDemoSettings: ", "--").replace("_", "-"))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """Run a demo: ``--digits`` (and its own arguments) for :func:`resu.demo.digits.main`, else the SmolLM2
    demo (:func:`resu.demo.lm.main`). Returns that demo's result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--digits" in argv:
        from resu.demo import digits

        argv.remove("--digits")
        return digits.main(argv)
    args = _parse_lm_args(argv)
    from resu.demo import lm

    return lm.main(args.settings)
