"""Evaluating a (pruned, resurrected) language model: perplexity and a greedy generation smoke check."""

from resu.eval.generate import generate_text
from resu.eval.perplexity import perplexity

__all__ = ["generate_text", "perplexity"]
