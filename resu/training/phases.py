"""The training-free phases of a cycle (PRUNE, STABILIZE, COMMIT) and the helpers they share."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

import resu
from resu.api.commit import CommitStats, commit_, commit_merged_
from resu.api.params import resu_parameters
from resu.api.stabilize import capture_reference, stabilize_
from resu.prune.registry import COMMIT_STRATEGIES, PRUNE_METHODS
from resu.prune.select import n_to_prune
from resu.tensors.mode import ResuMode
from resu.training.config import RESUConfig


def ensure_sparsified(model: nn.Module) -> nn.Module:
    """``model`` with ResuParameter weights: a plain model is converted with :func:`resu.sparsify_`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not any(True for _ in resu_parameters(model)):
        resu.sparsify_(model)
    if not any(True for _ in resu_parameters(model)):
        raise ValueError("`model` has no nn.Linear weight to sparsify; RESU training needs at least one")
    return model


def model_sparsity(model: nn.Module) -> float:
    """Pruned share of all ResuParameter slots that the forward leaves out (θ slots count as used)."""
    pruned = total = 0
    for _, p in resu_parameters(model):
        total += p.numel()
        if p.mode is ResuMode.SPARSE:
            pruned += p.n_pruned
    return pruned / total if total else 0.0


def pruned_masks(model: nn.Module) -> dict[int, torch.Tensor]:
    """The pruned slots of every ResuParameter (all False for DENSE ones), by ``id``."""
    out = {}
    for _, p in resu_parameters(model):
        out[id(p)] = ~p.active_mask
    return out


def _expected_pruned(p, sparsity: float, scope: str) -> int:
    if scope == "global" or p.dim() < 2:
        return n_to_prune(p.numel(), sparsity)
    cols = p.shape[-1]
    return (p.numel() // cols) * n_to_prune(cols, sparsity) if cols else 0


def needs_pruning(model: nn.Module, sparsity: float, scope: str) -> bool:
    """True when some weight is DENSE or has fewer pruned slots than ``sparsity`` asks for."""
    for _, p in resu_parameters(model):
        if p.mode is ResuMode.DENSE or p.n_pruned < _expected_pruned(p, sparsity, scope):
            return True
    return False


@torch.no_grad()
def adopt_zero_masks_(model: nn.Module) -> None:
    """After a custom pruner: a weight it left DENSE gets the mask of its exact zeros (SPARSE mode)."""
    for _, p in resu_parameters(model):
        if p.mode is ResuMode.DENSE:
            p._apply_pruning_(p.effective_weight() == 0)


def run_pruner(pruner: Any, model: nn.Module, sparsity: float) -> None:
    """Call a custom pruner: an object with ``.prune(sparsity)`` or a callable ``pruner(model, sparsity)``."""
    if hasattr(pruner, "prune"):
        pruner.prune(sparsity)
    elif callable(pruner):
        pruner(model, sparsity)
    else:
        raise TypeError("`pruner` must have a .prune(sparsity) method or be a callable pruner(model, sparsity)")
    adopt_zero_masks_(model)


def run_stabilizer(stabilizer: Any, model: nn.Module, calib: list) -> int:
    """Call a custom stabilizer (``.stabilize(calib)`` or ``stabilizer(model, calib)``); returns its swap count
    when it reports one (an int or an object with ``n_swaps``), else 0."""
    if hasattr(stabilizer, "stabilize"):
        result = stabilizer.stabilize(calib)
    elif callable(stabilizer):
        result = stabilizer(model, calib)
    else:
        raise TypeError("`stabilizer` must have a .stabilize(calib) method or be a callable stabilizer(model, calib)")
    adopt_zero_masks_(model)
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return int(getattr(result, "n_swaps", 0) or 0)


def prune_phase(
    model: nn.Module,
    config: RESUConfig,
    sparsity: float,
    calib: Callable[[], list],
    forward_fn,
    pruner: Optional[Any],
    generator: torch.Generator,
) -> tuple[bool, Optional[dict[str, torch.Tensor]]]:
    """PRUNE up to ``sparsity`` when the model is not that sparse yet.

    Returns whether it pruned, and the weights from just before (DSNoT's reference).
    """
    if not needs_pruning(model, sparsity, config.pruning_scope):
        return False, None
    reference = capture_reference(model)
    if pruner is not None:
        run_pruner(pruner, model, sparsity)
        return True, reference
    method = config.pruning_method
    needs_calib = PRUNE_METHODS.get(method, "RESUConfig", "pruning_method").statistic is not None
    resu.prune_(
        model,
        sparsity,
        method=method,
        scope=config.pruning_scope,
        calib=calib() if needs_calib else None,
        forward_fn=forward_fn,
        generator=generator,
    )
    return True, reference


def commit_phase(
    model: nn.Module,
    config: RESUConfig,
    cycle: int,
    sparsity: float,
    calib: Callable[[], list],
    train_fn,
    forward_fn,
    was_pruned: Optional[dict[str, torch.Tensor]],
) -> CommitStats:
    """COMMIT: merge θ and choose the next mask at ``sparsity`` with the configured strategy."""
    strategy = config.commit_strategy
    if strategy == "amnesty" and not config.use_amnesty:
        strategy = "reprune"  # the no-amnesty ablation: one joint ranking
    entry = COMMIT_STRATEGIES.get(strategy, "RESUConfig", "commit_strategy")
    score_type = config.amnesty_score_type
    options = dict(
        cycle=cycle,
        num_cycles=config.num_cycles,
        r_start=config.amnesty_r_start,
        r_end=config.amnesty_r_end,
        target_sparsity=sparsity if entry.prunes else None,
        score_type=score_type,
        calib=calib() if entry.needs_calibration(score_type) else None,  # drawn only when needed
        scope=config.pruning_scope,
        loss_fn=train_fn,
        forward_fn=forward_fn,
    )
    if was_pruned is None:
        return commit_(model, strategy, **options)
    # Active weights trained along (freeze_active_during_resu=False): the weights are DENSE already.
    merged = [(name, p, was_pruned[name]) for name, p in resu_parameters(model) if name in was_pruned]
    return commit_merged_(model, merged, strategy, options)


def stabilize_phase(
    model: nn.Module,
    config: RESUConfig,
    rounds: int,
    calib: Callable[[], list],
    forward_fn,
    reference: Optional[dict[str, torch.Tensor]],
    stabilizer: Optional[Any],
) -> int:
    """STABILIZE after a prune: the custom stabilizer, or DSNoT for at most ``rounds`` swap rounds."""
    if rounds <= 0:
        return 0
    if stabilizer is not None:
        return run_stabilizer(stabilizer, model, calib())
    if config.stabilize_method == "none":
        return 0
    return stabilize_(model, calib(), reference=reference, max_rounds=rounds, forward_fn=forward_fn).n_swaps
