"""The built-in commit strategies, registered in :data:`resu.prune.registry.COMMIT_STRATEGIES`.

After a RESU phase θ is merged into the weight and a strategy picks the slots that stay active;
:func:`resu.commit_` and the cycle trainer's COMMIT phase both look strategies up here.
"""

from __future__ import annotations

import torch

from resu.prune.amnesty import amnesty_keep, capped_amnesty_keep, joint_keep
from resu.prune.registry import register_commit_strategy


def _joint(scores: torch.Tensor, was_pruned: torch.Tensor, n_keep: torch.Tensor, budget: float) -> torch.Tensor:
    """One ranking of all merged slots: resurrected and active ones compete on equal terms."""
    return joint_keep(scores, n_keep)


# Active and resurrected slots compete in separate tournaments, r(c) of the places reserved for the latter.
register_commit_strategy("amnesty", amnesty_keep, uses_budget=True)
# The same tournaments with r(c) as a cap: a θ slot takes a place only where it outscores the active
# slot it would evict (what a short RESU phase on a pretrained model needs: most θ are still small).
register_commit_strategy("amnesty_capped", capped_amnesty_keep, uses_budget=True)
# One joint Wanda ranking of the merged weights.
register_commit_strategy("wanda_reprune", _joint, score_type="wanda")
# One joint ranking by the caller's score type (the no-amnesty ablation).
register_commit_strategy("reprune", _joint)
# Merge θ and prune nothing: every slot is active afterwards.
register_commit_strategy("simple", None)
