"""Pruning: registered prune methods and commit strategies, importance scores, selection of the
pruned set, calibration statistics, the amnesty tournament and DSNoT.

Importing this package registers the built-in methods and strategies (:mod:`resu.prune.methods`,
:mod:`resu.prune.commit_strategies`, :mod:`resu.prune.sparsegpt`), so :data:`~resu.prune.registry.PRUNE_METHODS` and
:data:`~resu.prune.registry.COMMIT_STRATEGIES` are always populated.
"""

from resu.prune import commit_strategies, methods, sparsegpt  # noqa: F401  (registrations)
