"""``SelectionConfig``: which θ coordinates a selective RESU step updates.

RESU-Selective trains only part of θ at each step. Two families of strategies:

- ``"consistency"`` (the seed algorithm): per θ slot, EMAs of the gradient and of its magnitude,
  m ← βm + (1−β)g and v ← βv + (1−β)|g|, give a consistency C = |m| / (v + δ) ∈ [0, 1) (1 when the
  gradient keeps its sign). Each step, P_mag = the ``k_screen`` slots of largest |g|, P_con = {C > τ},
  and the ``k_select`` slots of largest |g| in P_mag ∩ P_con are updated (all of them when fewer).
- ``"random"`` / ``"magnitude"`` (static subset): a subset S of ``k_select`` slots is chosen once per
  RESU phase (uniformly at random, or the largest |g| at the first step), optionally re-chosen every
  ``refresh_every`` steps; only S is trained and its Adam states are sized |S|, not |θ|.

Counts: with p θ slots in a weight, ``k = max(1, round_half_up(ratio · p))`` (never more than p; 0
when p = 0). Ranking by |g| breaks ties by the lower θ index, so selections are reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

STRATEGIES = ("consistency", "random", "magnitude")


def selection_count(ratio: float, n_slots: int) -> int:
    """``max(1, round_half_up(ratio · n_slots))`` capped at ``n_slots`` (0 when there are no slots)."""
    if n_slots <= 0:
        return 0
    return min(n_slots, max(1, math.floor(ratio * n_slots + 0.5)))


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ValueError(f"SelectionConfig: `{name}` must be a number, got {value!r}")
    return float(value)


@dataclasses.dataclass
class SelectionConfig:
    """Configuration of RESU-Selective updates (see the module docstring for the algorithm).

    Args:
        beta: EMA coefficient of the gradient and gradient-magnitude averages, in [0, 1).
        delta: stabiliser of C = |m| / (v + δ), > 0.
        tau_stable: consistency threshold; only slots with C > tau_stable are eligible (finite).
        k_screen_ratio: fraction of θ slots screened by gradient magnitude (P_mag), in (0, 1].
        k_select_ratio: fraction of θ slots updated per step (consistency) or trained (static), in (0, 1].
        strategy: ``"consistency"``, ``"random"`` or ``"magnitude"``.
        refresh_every: static strategies only: re-choose the subset every this many steps of a weight
            (a positive int); None keeps one subset per RESU phase.
    """

    beta: float = 0.9
    delta: float = 1e-8
    tau_stable: float = 0.5
    k_screen_ratio: float = 0.5
    k_select_ratio: float = 0.2
    strategy: str = "consistency"
    refresh_every: Optional[int] = None

    def __post_init__(self) -> None:
        beta = _real(self.beta, "beta")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"SelectionConfig: `beta` must be in [0, 1), got {self.beta!r}")
        delta = _real(self.delta, "delta")
        if not (delta > 0.0 and math.isfinite(delta)):
            raise ValueError(f"SelectionConfig: `delta` must be a finite number > 0, got {self.delta!r}")
        tau = _real(self.tau_stable, "tau_stable")
        if not math.isfinite(tau):
            raise ValueError(f"SelectionConfig: `tau_stable` must be finite, got {self.tau_stable!r}")
        for name in ("k_screen_ratio", "k_select_ratio"):
            ratio = _real(getattr(self, name), name)
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"SelectionConfig: `{name}` must be in (0, 1], got {getattr(self, name)!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"SelectionConfig: unknown `strategy` {self.strategy!r}; expected one of "
                f"{', '.join(map(repr, STRATEGIES))}"
            )
        every = self.refresh_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
            raise ValueError(f"SelectionConfig: `refresh_every` must be None or an int >= 1, got {every!r}")
        if every is not None and self.strategy == "consistency":
            raise ValueError(
                "SelectionConfig: `refresh_every` applies to the static strategies ('random', 'magnitude'); "
                "leave it None with strategy='consistency'"
            )

    @property
    def is_static(self) -> bool:
        """True for the static-subset strategies (``"random"``, ``"magnitude"``)."""
        return self.strategy != "consistency"

    def screen_count(self, n_slots: int) -> int:
        """|P_mag| for a weight with ``n_slots`` θ slots."""
        return selection_count(self.k_screen_ratio, n_slots)

    def select_count(self, n_slots: int) -> int:
        """How many θ slots are updated per step (at most) / trained (static) out of ``n_slots``."""
        return selection_count(self.k_select_ratio, n_slots)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what optimizer ``state_dict()`` stores; loads with ``weights_only=True``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


__all__ = ["STRATEGIES", "SelectionConfig", "selection_count"]
