"""``prune_``: choose a mask for every ResuParameter of a model and enter SPARSE mode."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

import resu.prune  # noqa: F401  (registers the built-in prune methods)
from resu.api.params import require_resu_parameters
from resu.api.transaction import all_or_nothing
from resu.api.validation import check_choice, check_fraction, check_generator, refuse_theta_phase
from resu.prune.blocks import find_blocks
from resu.prune.calibration import linear_input_statistics
from resu.prune.registry import PRUNE_METHODS, PruneMethod, PruneResult, PruneSpec, parse_pattern
from resu.prune.sequential import sequential_prune_

SCOPES = ("row", "global")
CALIBRATIONS = ("auto", "sequential", "whole_model")
# Method names kept for compatibility: name → (registered method, pattern).
ALIASES = {"2:4": ("magnitude", "2:4")}


def prune_(
    model: nn.Module,
    sparsity: float,
    method: str = "magnitude",
    scope: str = "row",
    calib: Optional[Iterable[Any]] = None,
    *,
    pattern: Optional[str] = None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    generator: Optional[torch.Generator] = None,
    calibration: str = "auto",
) -> nn.Module:
    """Prune every ResuParameter of ``model`` to ``sparsity`` and put it in SPARSE mode, in place.

    Args:
        model: a model converted with :func:`resu.sparsify_`; its ResuParameters must be in DENSE or
            SPARSE mode (call :func:`resu.exit_resu_` first after a RESU phase).
        sparsity: fraction of slots to prune, in [0, 1].
        method: a registered prune method (:data:`resu.prune.registry.PRUNE_METHODS`): ``"magnitude"``
            (|W|), ``"wanda"`` (|W|·‖X‖ with activation norms from ``calib``), ``"random"``, and any
            method registered with :func:`resu.prune.registry.register_prune_method`. ``"2:4"`` is
            kept as a name for ``method="magnitude", pattern="2:4"``.
        scope: ``"row"`` prunes the same fraction of every output row; ``"global"`` ranks the whole
            weight matrix at once (each weight separately).
        calib: iterable of calibration batches, required by methods that need a calibration
            statistic (Wanda; see ``forward_fn``).
        pattern: ``"N:M"`` (such as ``"2:4"`` or ``"4:8"``) for semi-structured sparsity: the method's
            N lowest scores of every M consecutive input weights are pruned. It fixes the sparsity:
            pass ``sparsity=N/M``; in_features must be divisible by M.
        forward_fn: ``forward_fn(model, batch)`` runs one calibration batch; by default a tensor is
            passed as ``model(batch)``, a dict as ``model(**batch)``, a tuple/list as ``model(batch[0])``.
        generator: random generator for ``method="random"``.
        calibration: how a calibrated method sees its layers' inputs. ``"sequential"``: block by block
            (:func:`resu.prune.sequential.sequential_prune_`): each decoder block is calibrated on the
            outputs of the already pruned blocks before it, holding one block's activations and one
            Gram matrix at a time, as the Wanda and SparseGPT reference implementations do.
            ``"whole_model"``: hooks over whole-model forwards of the unpruned model. ``"auto"`` (default):
            sequential for Hugging Face models with a list of decoder blocks, whole-model otherwise.

    Returns:
        ``model`` itself. Pruned slots become exactly zero; existing gradients are cleared.

    Raises:
        ValueError: bad ``sparsity``/``method``/``scope``/``pattern``, a calibrated method without
            ``calib``, calibration inputs with NaN/inf values, no ResuParameters, a weight in
            RESU/QRESU mode or on the meta device. The model is left unchanged (also when a step
            fails midway: every weight is restored).
    """
    sparsity = check_fraction(sparsity, "sparsity", "prune_")
    if isinstance(method, str) and method in ALIASES:
        alias_method, alias_pattern = ALIASES[method]
        if pattern is not None:
            raise ValueError(
                f"prune_: method={method!r} means method={alias_method!r} with pattern={alias_pattern!r}; "
                "pass a pattern with a registered method instead"
            )
        method, pattern = alias_method, alias_pattern
    entry: PruneMethod = PRUNE_METHODS.get(method, "prune_", "method")
    check_choice(scope, "scope", SCOPES, "prune_")
    check_generator(generator, "prune_")
    spec = PruneSpec(sparsity, scope, parse_pattern(pattern, "prune_"), generator)
    _check_pattern_sparsity(spec)
    if entry.statistic is not None and calib is None:
        raise ValueError(f"prune_: method={method!r} needs calibration data; pass calib=<iterable of input batches>")
    params = require_resu_parameters(model, "prune_")
    for name, p in params:
        _check_can_prune(name, p, spec)
    check_choice(calibration, "calibration", CALIBRATIONS, "prune_")
    if entry.statistic is not None and _calibrates_sequentially(model, calibration):
        with all_or_nothing([p for _, p in params]):
            sequential_prune_(model, entry.name, spec, calib, forward_fn=forward_fn)
        return model
    stats = {}
    if entry.statistic is not None:
        stats = linear_input_statistics(model, {id(p): p for _, p in params}, entry.statistic, calib, forward_fn)
    results = [method_result(entry, name, p, stats.get(id(p)), spec) for name, p in params]
    apply_pruning_([p for _, p in params], results)
    return model


def _calibrates_sequentially(model: nn.Module, calibration: str) -> bool:
    if calibration != "auto":
        return calibration == "sequential"
    is_hf_model = getattr(getattr(model, "config", None), "model_type", None) is not None
    return is_hf_model and find_blocks(model) is not None


def apply_pruning_(params: list, results: list[PruneResult]) -> None:
    """Put every ResuParameter of ``params`` in SPARSE mode with its :class:`PruneResult` (the mask, and
    the new values of the surviving slots where the result has them); all of them, or none if one fails.

    For callers that compute the results themselves (block-by-block calibration, say): ``results`` come
    from :func:`method_result`.
    """
    with all_or_nothing(params), torch.no_grad():
        for p, result in zip(params, results):
            p._apply_pruning_(result.pruned)
            if result.weight is not None:
                p.copy_(result.weight)  # SPARSE: the pruned slots stay zero
            p.grad = None


def _check_pattern_sparsity(spec: PruneSpec) -> None:
    if spec.pattern is None:
        return
    n, m = spec.pattern
    if not math.isclose(spec.sparsity, n / m, rel_tol=0.0, abs_tol=1e-9):
        raise ValueError(
            f"prune_: pattern '{n}:{m}' prunes exactly {n}/{m} of the weights; pass sparsity={n / m:g}, got {spec.sparsity}"
        )


def _check_can_prune(name: str, p, spec: PruneSpec) -> None:
    if p.device.type == "meta":
        raise ValueError(
            f"prune_: `{name}` is on the meta device and holds no values to prune; materialize the model first "
            "(model.to_empty(device=...) and load its weights)"
        )
    refuse_theta_phase(name, p, "prune_", "before pruning again")
    if spec.pattern is not None and p.shape[-1] % spec.pattern[1]:
        n, m = spec.pattern
        raise ValueError(
            f"prune_: pattern '{n}:{m}' needs in_features divisible by {m}, but `{name}` has shape {tuple(p.shape)}; "
            "exclude it from sparsify_ with filter_fn or use another pattern"
        )


def method_result(entry: PruneMethod, name: str, p, stat: Optional[torch.Tensor], spec: PruneSpec) -> PruneResult:
    """Call prune method ``entry`` on a 2-D fp32 copy of ``p``'s effective weight (``name`` is ``p``'s name,
    for errors); check its answer and shape it as ``p`` (on ``p``'s device and dtype). Changes nothing."""
    rows, cols = (math.prod(p.shape[:-1]), p.shape[-1]) if p.dim() >= 2 else (1, p.numel())
    weight = p.effective_weight().reshape(rows, cols).to(torch.float32, copy=True)
    result = entry(weight, stat, spec)
    pruned = result.pruned
    if not isinstance(pruned, torch.Tensor) or pruned.dtype != torch.bool or pruned.numel() != p.numel():
        raise ValueError(
            f"prune_: method {entry.name!r} must return a bool tensor of {p.numel()} elements (True = pruned) "
            f"for `{name}`, got {_describe(pruned)}"
        )
    new_weight = result.weight
    if new_weight is not None:
        if not isinstance(new_weight, torch.Tensor) or new_weight.numel() != p.numel():
            raise ValueError(
                f"prune_: method {entry.name!r} returned a weight of {_describe(new_weight)} for `{name}`, "
                f"expected {p.numel()} elements"
            )
        if not bool(torch.isfinite(new_weight).all()):
            raise ValueError(f"prune_: method {entry.name!r} returned NaN or infinite weights for `{name}`")
        new_weight = new_weight.reshape(p.shape).to(p.device, p.dtype)
    return PruneResult(pruned.reshape(p.shape).to(p.device), new_weight)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"
