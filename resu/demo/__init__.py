"""Demos of resu, run with ``python -m resu.demo``.

- the default: SmolLM2-135M-Instruct pruned with Wanda, then recovered by sparse fine-tuning and by
  the RESU recipe at equal steps (:mod:`resu.demo.lm`);
- ``--digits``: RESU training cycles against one-shot pruning + fine-tuning of an MLP on
  scikit-learn's digits (:mod:`resu.demo.digits`).
"""

from resu.demo.cli import main

__all__ = ["main"]
