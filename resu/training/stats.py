"""``CycleStats``: what one RESU cycle did, as plain numbers (exportable to JSON/CSV)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class CycleStats:
    """Statistics of one cycle (TRAIN → PRUNE → STABILIZE → RESU → COMMIT).

    The first fourteen fields are the ones seed 000 lists. ``resu_updates`` counts θ coordinate
    updates (steps × θ values updated per step); ``mean_consistency`` is NaN unless selective
    updates are on; ``mean_selection_ratio`` is 1.0 without them (every θ is updated).
    ``resurrection_budget`` is r(c) of the amnesty tournament (0 for other commit strategies).
    """

    cycle: int
    target_sparsity: float
    actual_sparsity: float
    train_loss: float
    train_steps: int
    resu_steps: int
    resu_updates: int
    mean_consistency: float
    mean_selection_ratio: float
    resurrection_budget: float
    n_resurrected: int
    n_active_kept: int
    resurrection_rate: float
    duration_seconds: float
    # beyond the seed's list
    resu_loss: float = math.nan
    mask_churn: float = 0.0
    stabilize_swaps: int = 0
    pruned: bool = False
    eval_metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CycleStats":
        """The inverse of :meth:`to_dict` (unknown keys are ignored, missing extras take defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
