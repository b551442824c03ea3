"""Block-by-block (sequential) calibration and pruning of a decoder model.

As the Wanda and SparseGPT reference implementations do for large language models:

1. the calibration batches run through the model up to the first decoder block, whose inputs are
   captured (hidden states, attention mask, position ids/embeddings; caches off);
2. for each block in turn, the statistic the prune method needs is accumulated from the block's
   Linear inputs by replaying the block on the captured inputs, the block's ResuParameters are pruned
   (and, for reconstructing methods such as SparseGPT, their surviving weights updated), and the
   *pruned* block is replayed once more: its outputs are the next block's inputs.

So later blocks are calibrated on what the pruned upstream blocks actually produce.

Memory held at once:
  - one block's inputs for every calibration batch (tokens × hidden, in the model's dtype, plus the
    small per-batch kwargs); outputs replace inputs batch by batch, so one extra batch at a time;
  - statistics: one Gram matrix (in × in, fp32) at a time: a ``"gram"`` method replays the block once
    per distinct Linear input (4 times for a Llama block: q/k/v share one, gate/up another, o and down
    one each), and the Gram of a shared input serves every weight reading it; ``"input_sqnorm"``
    vectors are tiny, so one replay serves every weight of the block;
  - with ``order="parallel"`` (the default), the prune results of the block's weights until the whole
    block is calibrated (one fp32 copy of each reconstructed weight, and its bool mask).

Weights outside the blocks (an untied output head, say), and models without recognisable blocks,
are calibrated with hooks over whole-model forwards (:func:`whole_model_prune_`), after the blocks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

import resu.prune.sparsegpt  # noqa: F401  (registers "sparsegpt")
from resu.api.params import require_resu_parameters
from resu.prune.blocks import BlocksArg, BlockInputs, block_output, capture_block_inputs, find_blocks
from resu.prune.calibration import default_forward
from resu.prune.input_statistics import InputStatistic
from resu.prune.registry import PRUNE_METHODS, PruneMethod, PruneResult, PruneSpec
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

ORDERS = ("parallel", "sequential")
ForwardFn = Callable[[nn.Module, Any], Any]


class _Target:
    """A ResuParameter to prune, its name, and the Linear modules that use it."""

    def __init__(self, name: str, param: ResuParameter):
        self.name, self.param, self.modules = name, param, []


def _targets(model: nn.Module, caller: str) -> list[_Target]:
    params = require_resu_parameters(model, caller)
    for name, p in params:
        if p.mode.trains_theta:
            exit_fn = "exit_qresu_" if p.mode is ResuMode.QRESU else "exit_resu_"
            raise ValueError(f"{caller}: `{name}` is in {p.mode.name} mode; call resu.{exit_fn}(model) before pruning again")
    by_id = {id(p): _Target(name, p) for name, p in params}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in by_id:
            by_id[id(module.weight)].modules.append(module)
    return list(by_id.values())


def apply_prune_result_(param: ResuParameter, result: PruneResult) -> None:
    """Write a prune result into ``param``: the reconstructed weight (if any), then the mask (SPARSE mode)."""
    with torch.no_grad():
        if result.weight is not None:
            param.copy_(result.weight.reshape(param.shape).to(param.dtype))
        param._apply_pruning_(result.pruned.reshape(param.shape))
    param.grad = None


def _run_method(pm: PruneMethod, target: _Target, stat: Optional[torch.Tensor], spec: PruneSpec, caller: str) -> PruneResult:
    p = target.param
    weight = p.effective_weight().reshape(p.shape[0], -1).to(torch.float32, copy=True)  # methods get a copy
    if pm.statistic is not None and stat is None:
        raise ValueError(f"{caller}: `{target.name}` saw no input during calibration; make sure the calibration batches run it")
    try:
        return pm(weight, stat, spec)
    except Exception as exc:  # name the layer: the method only saw a matrix
        message = f"{caller}: method {pm.name!r} failed on `{target.name}`: {exc}"
        try:
            renamed = type(exc)(message)
        except Exception:
            renamed = RuntimeError(message)
        raise renamed from exc


def _shared_input_groups(targets: list[_Target], replay: Callable[[Optional[int]], None]) -> list[list[_Target]]:
    """``targets`` grouped by the input tensor their Linear modules receive (q/k/v projections read the
    same normed hidden states; gate/up projections too), found by replaying one calibration batch.

    The probe keeps the input tensors alive while it runs, so two different inputs cannot share an id.
    A target that saw no input in the probe is a group of its own.
    """
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(targets))}
    handles = []
    for i, t in enumerate(targets):
        for module in t.modules:
            handles.append(module.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0])))
    try:
        replay(1)
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[_Target]] = {}
    for i, t in enumerate(targets):
        key = tuple(id(x) for x in seen[i]) or ("no input", i)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def _calibrate_and_prune(
    targets: list[_Target],
    pm: PruneMethod,
    spec: PruneSpec,
    replay: Callable[[Optional[int]], None],
    order: str,
    caller: str,
) -> None:
    """Prune ``targets``; ``replay(n)`` runs the first ``n`` (None: all) calibration inputs through the
    modules that use them.

    An ``"input_sqnorm"`` method in parallel order replays once for all targets (the vectors are tiny).
    Otherwise the targets are grouped by shared input, and each group replays once and accumulates one
    statistic, which is freed before the next group's: one Gram matrix is alive at a time.
    ``order="parallel"`` calibrates every target on the unpruned modules and applies the results at the
    end; ``"sequential"`` applies each group's results before the next group is calibrated.
    """
    if pm.statistic is None:
        for t in targets:
            apply_prune_result_(t.param, _run_method(pm, t, None, spec, caller))
        return
    if not targets:
        return
    if pm.statistic == "input_sqnorm" and order == "parallel":
        groups = [[t] for t in targets]
        passes = [groups]
    else:
        passes = [[group] for group in _shared_input_groups(targets, replay)]
    pending: list[tuple[_Target, PruneResult]] = []
    for groups in passes:
        # one statistic per group, accumulated on the group's first target (the others share its input)
        stats = [InputStatistic(pm.statistic, group[0].modules) for group in groups]
        for s in stats:
            s.__enter__()
        try:
            replay(None)
        finally:
            for s in stats:
                s.__exit__()
        for group, s in zip(groups, stats):
            results = [(t, _run_method(pm, t, s.value, spec, caller)) for t in group]
            s.value = None  # free the statistic before the next one is accumulated
            if order == "sequential":
                for t, result in results:
                    apply_prune_result_(t.param, result)
            else:
                pending += results
    for t, result in pending:
        apply_prune_result_(t.param, result)


def whole_model_prune_(
    model: nn.Module,
    method: str,
    spec: PruneSpec,
    calib: Iterable[Any],
    *,
    forward_fn: Optional[ForwardFn] = None,
    order: str = "parallel",
    only: Optional[list] = None,
) -> nn.Module:
    """Calibrate with hooks over whole-model forwards and prune (the fallback of :func:`sequential_prune_`).

    ``only``: restrict to these ResuParameters (default: all of the model's). Holds one Gram matrix at
    a time (one pass over ``calib`` per distinct Linear input for a ``"gram"`` method).
    """
    caller = "whole_model_prune_"
    pm = PRUNE_METHODS.get(method, caller, "method")
    if order not in ORDERS:
        raise ValueError(f"{caller}: order must be one of {ORDERS}, got {order!r}")
    targets = _targets(model, caller)
    if only is not None:
        wanted = {id(p) for p in only}
        targets = [t for t in targets if id(t.param) in wanted]
    calib = list(calib)
    if pm.statistic is not None and not calib:
        raise ValueError(f"{caller}: method {method!r} needs calibration data; pass calib=<non-empty iterable of batches>")
    run = forward_fn or default_forward

    def replay(n_batches: Optional[int]) -> None:
        for batch in calib[:n_batches]:
            run(model, batch)

    with _eval_mode(model), torch.no_grad():
        _calibrate_and_prune(targets, pm, spec, replay, order, caller)
    return model


def sequential_prune_(
    model: nn.Module,
    method: str,
    spec: Union[PruneSpec, float],
    calib: Iterable[Any],
    *,
    blocks: BlocksArg = None,
    forward_fn: Optional[ForwardFn] = None,
    order: str = "parallel",
) -> nn.Module:
    """Prune every ResuParameter of ``model`` with a registered method, calibrating block by block.

    Args:
        model: a model converted with :func:`resu.sparsify_` (weights in DENSE or SPARSE mode), typically a
            Hugging Face decoder (Llama/Qwen2 ``model.model.layers``, GPT-2 ``model.transformer.h``).
        method: a name registered in :data:`resu.prune.registry.PRUNE_METHODS` (``"sparsegpt"``, ``"wanda"``, ...).
        spec: a :class:`PruneSpec` (sparsity, scope, N:M pattern), or just the sparsity.
        calib: calibration batches (needed unless the method uses no statistic).
        blocks: override the block detection: a module path (``"model.layers"``), or the blocks.
            By default the longest ``nn.ModuleList`` of same-type modules; without one, every weight is
            calibrated on whole-model forwards (:func:`whole_model_prune_`).
        forward_fn: ``forward_fn(model, batch)`` runs one batch (default: a tensor as ``model(t)``, a dict
            as ``model(**d)``, a tuple/list as ``model(batch[0])``).
        order: ``"parallel"`` (the reference implementations' choice): all weights of a block are
            calibrated on the unpruned block; ``"sequential"``: each weight is calibrated after the ones
            before it in the block (module order) are pruned.

    Returns:
        ``model``, its ResuParameters in SPARSE mode. See the module doc for the memory held.

    Raises:
        ValueError: unknown method or order, empty ``calib``, no ResuParameters, or a weight in RESU/QRESU
            mode; the model is left unchanged. An error of the method itself (SparseGPT's Hessian not
            positive definite, say) names the layer; the blocks before it are pruned by then.
    """
    caller = "sequential_prune_"
    pm = PRUNE_METHODS.get(method, caller, "method")
    if not isinstance(spec, PruneSpec):
        spec = PruneSpec(float(spec))
    if order not in ORDERS:
        raise ValueError(f"{caller}: order must be one of {ORDERS}, got {order!r}")
    targets = _targets(model, caller)
    if pm.statistic is None:
        _calibrate_and_prune(targets, pm, spec, lambda n: None, order, caller)
        return model
    calib = list(calib) if calib is not None else []
    if not calib:
        raise ValueError(f"{caller}: method {method!r} needs calibration data; pass calib=<non-empty iterable of batches>")
    found = find_blocks(model, blocks)
    if found is None:
        return whole_model_prune_(model, method, spec, calib, forward_fn=forward_fn, order=order)
    forward_fn = forward_fn or default_forward
    per_block = _targets_per_block(found, targets)
    last = max((i for i, here in enumerate(per_block) if here), default=-1)
    with _eval_mode(model), torch.no_grad():
        inputs = capture_block_inputs(model, found[0], calib, forward_fn) if last >= 0 else []
        for i in range(last + 1):  # blocks after the last one with a weight to prune are not run
            block = found[i]
            _calibrate_and_prune(per_block[i], pm, spec, lambda n: _replay(block, inputs[:n]), order, caller)
            if i < last:
                for b, inp in enumerate(inputs):  # the pruned block's outputs feed the next block
                    inputs[b] = inp.with_hidden(block_output(block(*inp.args, **inp.kwargs)))
        del inputs
    done = {id(t.param) for here in per_block for t in here}
    rest = [t.param for t in targets if id(t.param) not in done]
    if rest:
        whole_model_prune_(model, method, spec, calib, forward_fn=forward_fn, order=order, only=rest)
    return model


def _targets_per_block(blocks: list[nn.Module], targets: list[_Target]) -> list[list[_Target]]:
    """The targets used inside each block (a weight shared by several blocks goes with the first)."""
    taken: set[int] = set()
    per_block = []
    for block in blocks:
        inside = {id(m) for m in block.modules()}
        here = [t for t in targets if id(t.param) not in taken and any(id(m) in inside for m in t.modules)]
        taken.update(id(t.param) for t in here)
        per_block.append(here)
    return per_block


def _replay(block: nn.Module, inputs: list[BlockInputs]) -> None:
    for inp in inputs:
        block(*inp.args, **inp.kwargs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode for the calibration; each gets its own train/eval flag back after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
