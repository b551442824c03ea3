"""Registries: every prune method and commit strategy is registered once, here, by name.

``resu.prune_``, ``resu.commit_`` and the cycle trainer look names up in these tables instead of
branching on strings, so adding a method is one decorated function::

    @register_prune_method("my_method", statistic="input_sqnorm")
    def my_method(weight, stat, spec):          # weight: 2-D fp32 copy of the effective weight
        return lowest_scores(weight.abs() * stat.sqrt(), spec.sparsity, spec.scope)

A prune method returns a boolean tensor of the weight's shape (True = pruned), or a
:class:`PruneResult` when it also moves the surviving weights (SparseGPT's reconstruction update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Optional, TypeVar, Union

import torch

T = TypeVar("T")

# What a calibrated method needs from the inputs x (tokens × in_features) of its layer:
#   "input_sqnorm": Σ x_j² per input feature (shape (in,)), the diagonal of the Gram matrix (Wanda);
#   "gram":         Σ x xᵀ (shape (in, in)), the Gram/Hessian matrix (SparseGPT, DSNoT).
STATISTICS = ("input_sqnorm", "gram")


class Registry(Generic[T]):
    """A name → entry table whose lookups fail with the list of registered names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str, caller: str, argument: str) -> T:
        """The entry called ``name``; a ValueError naming ``caller``'s ``argument`` and the choices otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            choices = ", ".join(map(repr, self.names()))
            raise ValueError(f"{caller}: unknown `{argument}` {name!r}; expected one of {choices}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: ``sparsity`` in [0, 1]; ``scope`` "row" (same fraction per output row) or
    "global" (per weight matrix); ``pattern`` (n, m) for N:M (prune n of every m consecutive inputs,
    which fixes the sparsity at n/m); ``generator`` for random choices."""

    sparsity: float
    scope: str = "row"
    pattern: Optional[tuple[int, int]] = None
    generator: Optional[torch.Generator] = None


@dataclass
class PruneResult:
    """A prune method's answer: ``pruned`` (bool, the weight's shape, True = pruned) and, for methods
    that reconstruct, the new ``weight`` (active slots updated; pruned slots are zeroed by the caller)."""

    pruned: torch.Tensor
    weight: Optional[torch.Tensor] = None


PruneFn = Callable[[torch.Tensor, Optional[torch.Tensor], PruneSpec], Union[torch.Tensor, PruneResult]]


@dataclass(frozen=True)
class PruneMethod:
    """A registered prune method: ``fn(weight, stat, spec)``, and the calibration ``statistic`` it needs
    (None, or one of :data:`STATISTICS`)."""

    name: str
    fn: PruneFn
    statistic: Optional[str] = None

    def __call__(self, weight: torch.Tensor, stat: Optional[torch.Tensor], spec: PruneSpec) -> PruneResult:
        out = self.fn(weight, stat, spec)
        return out if isinstance(out, PruneResult) else PruneResult(out)


# keep(scores, was_pruned, n_keep, budget) -> keep: per row of the 2-D ``scores`` (higher is better),
# the ``n_keep[i]`` slots that stay active; ``was_pruned`` marks the slots that held θ.
KeepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class CommitStrategy:
    """A registered commit strategy: how the next mask is chosen once θ is merged.

    ``keep`` is None for a strategy that keeps every merged slot (no scores, no target sparsity);
    ``score_type`` forces the scores it ranks by (None: the caller's ``score_type``);
    ``uses_budget``: it reserves the resurrection budget r(c) for resurrected slots.
    """

    name: str
    keep: Optional[KeepFn]
    score_type: Optional[str] = None
    uses_budget: bool = False

    @property
    def prunes(self) -> bool:
        """False for a strategy that keeps every merged slot."""
        return self.keep is not None

    def scoring(self, score_type: str) -> Optional[str]:
        """The score type this strategy ranks by when the caller asks for ``score_type`` (None: no scores)."""
        if not self.prunes:
            return None
        return self.score_type or score_type

    def needs_calibration(self, score_type: str) -> bool:
        """True when its scores need calibration batches (Wanda or gradient scores)."""
        return self.scoring(score_type) in ("wanda", "gradient")


PRUNE_METHODS: Registry[PruneMethod] = Registry("prune method")
COMMIT_STRATEGIES: Registry[CommitStrategy] = Registry("commit strategy")


def register_prune_method(name: str, *, statistic: Optional[str] = None) -> Callable[[PruneFn], PruneFn]:
    """Decorator: register ``fn(weight, stat, spec)`` as prune method ``name`` (see the module doc)."""
    if statistic is not None and statistic not in STATISTICS:
        raise ValueError(f"statistic must be None or one of {STATISTICS}, got {statistic!r}")

    def decorate(fn: PruneFn) -> PruneFn:
        PRUNE_METHODS.add(name, PruneMethod(name, fn, statistic))
        return fn

    return decorate


def register_commit_strategy(
    name: str, keep: Optional[KeepFn], *, score_type: Optional[str] = None, uses_budget: bool = False
) -> CommitStrategy:
    """Register commit strategy ``name`` (see :class:`CommitStrategy`); returns the entry."""
    return COMMIT_STRATEGIES.add(name, CommitStrategy(name, keep, score_type, uses_budget))


def parse_pattern(pattern, caller: str) -> Optional[tuple[int, int]]:
    """``"N:M"`` as ``(n, m)`` with 0 < n < m (None stays None); a ValueError naming ``pattern`` otherwise."""
    if pattern is None:
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(
        f"{caller}: `pattern` must be a string 'N:M' with 0 < N < M (prune N of every M consecutive inputs), "
        f"such as '2:4', got {pattern!r}"
    )
