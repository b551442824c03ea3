"""Host arithmetic of launch grids.

``triton.cdiv`` is a Triton function object: called from Python it costs about 1.4 µs (Triton 3.9),
against a few nanoseconds for the integer expression below, and a grouped optimizer step calls it
twice per weight. Every launcher sizes its grid with :func:`cdiv` instead.
"""

from __future__ import annotations


def cdiv(n: int, d: int) -> int:
    """⌈n / d⌉ for integers, ``d`` > 0."""
    return -(-n // d)
