"""``resu.core.selective.SelectionConfig``: the RESU-Selective config, under the seed API's import path.

It lives with the optimizer that uses it, in :mod:`resu.optim.selection_config`.
"""

from resu.optim.selection_config import STRATEGIES, SelectionConfig, selection_count

__all__ = ["STRATEGIES", "SelectionConfig", "selection_count"]
