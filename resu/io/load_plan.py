"""Loading is all-or-nothing: :func:`plan_load` checks a whole file against the model, :func:`apply_plan_`
then changes the model, and puts it back if anything fails midway."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from resu.api.transaction import all_or_nothing
from resu.io.checks import ResuEntry, check_entry_header, check_inner, check_plain, fail
from resu.io.format import inner_key
from resu.tensors.layout import ALL_INNER_NAMES
from resu.tensors.resu_parameter import ResuParameter


class LoadResult(NamedTuple):
    """What ``load_state_dict`` returns: keys the file lacked and file entries the model has no place for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class LoadPlan(NamedTuple):
    resu: list[tuple[ResuParameter, ResuEntry]]
    plain: list[tuple[torch.Tensor, torch.Tensor]]
    result: LoadResult


def _check_resu_entries(source, targets, params, tensors) -> dict[str, ResuEntry]:
    """Every ResuParameter of the file that the model has, checked (header, inner tensors, no stray ones)."""
    entries: dict[str, ResuEntry] = {}
    for name, entry in params.items():
        target = targets.get(name)
        if target is None:
            continue  # unexpected: reported with the other keys
        if not isinstance(target, ResuParameter):
            raise fail(source, name, "params", "is a ResuParameter in the file but a plain tensor in the model; "
                       "call resu.sparsify_(model) (with the same filter_fn) before loading")
        layout, shape = check_entry_header(source, name, entry, target)
        entries[name] = check_inner(source, name, layout, shape, target.dtype, tensors)
        stray = [k for k in (inner_key(name, a) for a in ALL_INNER_NAMES if a not in layout.inner_names) if k in tensors]
        if stray:
            raise fail(source, name, "tensors", f"the file holds {stray}, which its {layout.mode.value} layout does not use")
    return entries


def _check_plain_entries(source, targets, tensors, plain_keys) -> None:
    for key in [k for k in tensors if k in plain_keys]:  # file order: the first problem is reported
        target = targets.get(key)
        if target is None:
            continue
        if isinstance(target, ResuParameter):
            raise fail(source, key, "params", "is a ResuParameter in the model but a plain tensor in the file; "
                       "it was saved from a model without resu.sparsify_ (load it with load_state_dict)")
        check_plain(source, key, tensors[key], target)


def plan_load(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    params: dict[str, dict],
    tied: dict[str, str],
    *,
    strict: bool,
    source: str,
    resu_only: bool = False,
) -> LoadPlan:
    """Check everything the file holds against ``model`` (changing nothing) and say what to write where.

    ``resu_only``: the file holds the ResuParameters only (the other weights come from elsewhere), so
    plain ``state_dict`` keys are neither expected nor missing, and plain tensors in it are unexpected.
    """
    targets = model.state_dict(keep_vars=True)
    resu_entries = _check_resu_entries(source, targets, params, tensors)
    inner_keys = {inner_key(n, a) for n in params for a in ALL_INNER_NAMES}
    plain_keys = {k for k in tensors if k not in inner_keys}
    covered = set(params) | set(tied)
    unexpected = sorted(k for k in covered | plain_keys if k not in targets or (resu_only and k in plain_keys))
    if resu_only:
        plain_keys = set()  # never loaded from a layout file
    _check_plain_entries(source, targets, tensors, plain_keys)
    for alias, canonical in tied.items():
        if canonical not in params and canonical not in plain_keys:
            raise fail(source, alias, "tied", f"refers to `{canonical}`, which the file does not hold")
    if resu_only:
        expected = covered | {k for k, v in targets.items() if isinstance(v, ResuParameter)}
    else:
        expected = set(targets)
    missing = sorted(k for k in expected if k not in covered and k not in plain_keys)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source}: the file does not match the model: missing keys {missing}, unexpected keys {unexpected}; "
            "the model is unchanged (pass strict=False to load the matching entries only)"
        )

    resu_plan, plain_plan = [], []
    for key, target in targets.items():
        if key not in covered and key not in plain_keys:
            continue
        source_key = tied.get(key, key)
        if isinstance(target, ResuParameter):
            if source_key not in resu_entries:
                raise fail(source, key, "tied", f"is a ResuParameter in the model but `{source_key}` is not one in the file")
            resu_plan.append((target, resu_entries[source_key]))
        elif source_key in resu_entries:
            raise fail(source, key, "tied", f"is a plain tensor in the model but `{source_key}` is a ResuParameter in the file")
        else:
            value = tensors[source_key]
            check_plain(source, key, value, target)
            plain_plan.append((target, value))
    return LoadPlan(resu_plan, plain_plan, LoadResult(missing, unexpected))


def _install(p: ResuParameter, entry: ResuEntry) -> None:
    """``p`` becomes the entry: values, mode, mask, quantized state, layout id, selective tag and write policy."""
    inner = {k: t.to(p.device) for k, t in entry.inner.items()}
    src = ResuParameter(entry.layout, inner, shape=entry.shape)
    p.copy_(src)  # adopts the mode and mask (resu.tensors.resu_ops), as load_state_dict does
    p.set_selective(entry.layout.selective)
    p.set_write_policy(entry.layout.write_policy)


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: LoadPlan) -> LoadResult:
    """Write the checked plan into ``model``; if a write fails, every weight and buffer is put back."""
    done: set[int] = set()
    resu_params = list({id(p): p for p, _ in plan.resu}.values())
    plain_saved = [(t, t.detach().clone()) for t, _ in plan.plain]
    with all_or_nothing(resu_params):
        try:
            for p, entry in plan.resu:
                if id(p) not in done:
                    _install(p, entry)
                    done.add(id(p))
            for target, value in plan.plain:
                target.copy_(value.to(target.device))
        except BaseException:
            for target, old in plain_saved:
                target.copy_(old)
            raise
    return plan.result


__all__ = ["LoadPlan", "LoadResult", "apply_plan_", "plan_load"]
