"""All-or-nothing model operations: undo every ResuParameter change when an operation fails midway.

Each model-level operation computes everything that can fail (arguments, calibration, scores, new
masks, quantized codes) before it changes a weight. What can still fail after that (an injected
error, running out of memory, an interrupt) is covered by :func:`all_or_nothing`: it keeps a copy
of every weight it guards and puts each one back, values, mode, mask, θ, gradient and tags, before
the error propagates. The copy costs one clone of the guarded weights for the operation's duration.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class _Saved:
    """One weight as it was: its attributes (mode, mask, quantized state, tags), a deep copy of its
    data (in-place writes change the storage the attributes point to) and its gradient."""

    def __init__(self, p):
        self.param = p
        self.attributes = dict(p.__dict__)
        with torch.no_grad():
            self.data = p.clone()
        self.grad = p.grad

    def restore(self) -> None:
        p = self.param
        p.__dict__.clear()
        p.__dict__.update(self.attributes)
        with torch.no_grad():
            p.copy_(self.data)  # the values, in place, into the storage the attributes point to
        p.__dict__.update(self.attributes)  # copy_ re-stamps the layout; the saved one is the truth
        p.grad = self.grad


@contextmanager
def all_or_nothing(params: Iterable) -> Iterator[None]:
    """Run the ``with`` body; if it raises, every ResuParameter of ``params`` is restored bitwise first."""
    saved = [_Saved(p) for p in params]
    try:
        yield
    except BaseException:
        for s in saved:
            s.restore()
        raise
