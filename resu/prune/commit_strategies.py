"""The built-in commit strategies, registered in :data:`resu.prune.registry.COMMIT_STRATEGIES`.

After a RESU phase θ is merged into the weight and a strategy picks the slots that stay active;
:func:`resu.commit_` and the cycle trainer's COMMIT phase both look strategies up here.
"""

from __future__ import annotations

from resu.prune.amnesty import amnesty_keep, joint_keep
from resu.prune.registry import register_commit_strategy

# Active and resurrected slots compete in separate tournaments, r(c) of the places reserved for the latter.
register_commit_strategy("amnesty", amnesty_keep, uses_budget=True)
# One joint Wanda ranking of the merged weights.
register_commit_strategy("wanda_reprune", lambda scores, old, n_keep, budget: joint_keep(scores, n_keep), score_type="wanda")
# One joint ranking by the caller's score type (the no-amnesty ablation).
register_commit_strategy("reprune", lambda scores, old, n_keep, budget: joint_keep(scores, n_keep))
# Merge θ and prune nothing: every slot is active afterwards.
register_commit_strategy("simple", None)
