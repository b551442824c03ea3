"""``adopt_zeros_``: continue from a checkpoint pruned elsewhere, its exact zeros becoming the mask."""

from __future__ import annotations

import torch.nn as nn

from resu.api.params import require_resu_parameters
from resu.api.validation import check_fraction
from resu.tensors.mode import ResuMode


def adopt_zeros_(model: nn.Module, *, min_sparsity: float = 0.0) -> nn.Module:
    """Put every DENSE ResuParameter whose weight has exact zeros in SPARSE mode, its zeros pruned.

    A model pruned by another tool (SparseGPT, Wanda, ...) and saved dense carries its mask only as
    zeros. After ``resu.sparsify_(model)`` this reads the mask back, so training continues in SPARSE
    mode (then RESU) without densifying: the zeros stay zero and only the other slots train.

    Args:
        model: a model converted with :func:`resu.sparsify_`.
        min_sparsity: a weight whose fraction of exact zeros is below this stays DENSE (a weight that
            was never pruned can hold a few zeros by chance; ``0.3`` keeps those dense). With the default
            0, any weight with at least one zero is adopted. In [0, 1].

    Returns:
        ``model`` itself. Weights already in SPARSE mode keep their mask; weights without zeros stay DENSE.

    Raises:
        ValueError: ``min_sparsity`` outside [0, 1], no ResuParameters (call ``resu.sparsify_`` first), or a
            weight in RESU/QRESU mode (its pruned slots hold θ, not zeros: call ``resu.exit_resu_`` /
            ``resu.exit_qresu_`` first). The model is left unchanged.
    """
    min_sparsity = check_fraction(min_sparsity, "min_sparsity", "adopt_zeros_")
    params = require_resu_parameters(model, "adopt_zeros_")
    for name, p in params:
        if p.mode.trains_theta:
            exit_fn = "exit_qresu_" if p.mode is ResuMode.QRESU else "exit_resu_"
            raise ValueError(
                f"adopt_zeros_: `{name}` is in {p.mode.name} mode, where pruned slots hold θ; call "
                f"resu.{exit_fn}(model) first"
            )
    for _, p in params:
        if p.mode is not ResuMode.DENSE:
            continue
        zeros = p.effective_weight() == 0
        n_zeros = int(zeros.sum())
        if n_zeros and n_zeros >= min_sparsity * zeros.numel():
            p._apply_pruning_(zeros)
            p.grad = None
    return model
