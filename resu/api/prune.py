"""``prune_``: choose a mask for every ResuParameter of a model and enter SPARSE mode."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from resu.api.params import require_resu_parameters
from resu.api.validation import check_choice, check_fraction
from resu.prune.calibration import activation_norms
from resu.prune.scores import magnitude_scores, wanda_scores
from resu.prune.select import lowest_scores, n_m_pruned, random_pruned
from resu.tensors.mode import ResuMode

METHODS = ("magnitude", "wanda", "random", "2:4")
SCOPES = ("row", "global")


def prune_(
    model: nn.Module,
    sparsity: float,
    method: str = "magnitude",
    scope: str = "row",
    calib: Optional[Iterable[Any]] = None,
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Prune every ResuParameter of ``model`` to ``sparsity`` and put it in SPARSE mode, in place.

    Args:
        model: a model converted with :func:`resu.sparsify_`; its ResuParameters must be in DENSE or
            SPARSE mode (call :func:`resu.exit_resu_` first after a RESU phase).
        sparsity: fraction of slots to prune, in [0, 1].
        method: ``"magnitude"`` (|W|), ``"wanda"`` (|W|·‖X‖ with activation norms from ``calib``),
            ``"random"``, or ``"2:4"`` (semi-structured: the 2 smallest |W| of every 4 consecutive
            input weights; needs ``sparsity=0.5`` and in_features divisible by 4).
        scope: ``"row"`` prunes the same fraction of every output row; ``"global"`` ranks the whole
            weight matrix at once (each weight separately).
        calib: iterable of calibration batches, required by Wanda (see ``forward_fn``).
        forward_fn: ``forward_fn(model, batch)`` runs one calibration batch; by default a tensor is
            passed as ``model(batch)``, a dict as ``model(**batch)``, a tuple/list as ``model(batch[0])``.
        generator: random generator for ``method="random"``.

    Returns:
        ``model`` itself. Pruned slots become exactly zero; existing gradients are cleared.

    Raises:
        ValueError: bad ``sparsity``/``method``/``scope``, Wanda without ``calib``, no ResuParameters,
            or a weight in RESU mode. The model is left unchanged.
    """
    sparsity = check_fraction(sparsity, "sparsity", "prune_")
    check_choice(method, "method", METHODS, "prune_")
    check_choice(scope, "scope", SCOPES, "prune_")
    if method == "wanda" and calib is None:
        raise ValueError(
            "prune_: method='wanda' needs calibration data; pass calib=<iterable of input batches>"
        )
    if method == "2:4" and sparsity != 0.5:
        raise ValueError(f"prune_: method='2:4' prunes exactly half of the weights; pass sparsity=0.5, got {sparsity}")
    params = require_resu_parameters(model, "prune_")
    for name, p in params:
        if method == "2:4" and p.shape[-1] % 4:
            raise ValueError(
                f"prune_: method='2:4' needs in_features divisible by 4, but `{name}` has shape {tuple(p.shape)}; "
                "exclude it from sparsify_ with filter_fn or use another method"
            )
        if p.mode.trains_theta:
            exit_fn = "exit_qresu_" if p.mode is ResuMode.QRESU else "exit_resu_"
            raise ValueError(
                f"prune_: `{name}` is in {p.mode.name} mode; call resu.{exit_fn}(model) before pruning again"
            )
    norms = None
    if method == "wanda":
        norms = activation_norms(model, {id(p): p for _, p in params}, calib, forward_fn)
    masks = []
    for _, p in params:
        if method == "random":
            pruned = random_pruned(p.shape, sparsity, device=p.device, generator=generator)
        elif method == "2:4":
            pruned = n_m_pruned(magnitude_scores(p.effective_weight()), 2, 4)
        else:
            w = p.effective_weight()
            scores = magnitude_scores(w) if method == "magnitude" else wanda_scores(w, norms[id(p)])
            pruned = lowest_scores(scores, sparsity, scope)
        masks.append(pruned)
    for (_, p), pruned in zip(params, masks):
        p._apply_pruning_(pruned)
        p.grad = None
    return model
