"""``load_quantized_``: fill a model built on the meta device from a checkpoint, straight into QRESU.

:func:`resu.enter_qresu_` needs the whole dense model in memory first. Here the dense weights are read
one tensor at a time (safetensors files are read a tensor at a time, never mapped whole) and every
selected ``nn.Linear`` weight is pruned and quantized as soon as it arrives; its dense copy
is dropped before the next one is read. Peak memory is the final QRESU model plus about one dense
weight (and the quantizer's temporaries for it, which work in row chunks).

What happens to each tensor of the model:

- a QRESU target (the weight of an ``nn.Linear`` selected by ``filter_fn`` and not shared with a
  non-Linear module, as :func:`resu.sparsify_` selects): read, pruned by ``method`` to ``sparsity``
  (one matrix at a time: ``scope="row"`` or ``"global"`` within the matrix; methods that need
  calibration data are refused), quantized, θ drawn as :func:`resu.enter_qresu_` draws it;
- every other parameter and persistent buffer (embeddings, norms, biases, a tied head): loaded dense,
  in the model's dtype;
- buffers the checkpoint does not hold (non-persistent ones such as rotary frequencies) are left as
  they are: build the model so that they are real tensors (``accelerate.init_empty_weights()`` keeps
  buffers off the meta device by default); a meta one is refused before anything is read.

A Hugging Face model's declared ties (``tie_word_embeddings``) are applied first (``model.tie_weights()``),
so a tied head is one tensor, loaded dense, as :func:`resu.sparsify_` leaves it.

The result is what ``sparsify_`` → ``prune_`` → ``enter_qresu_`` gives on the same model loaded densely:
the same codes, scales, masks and (with the same generator) θ, bitwise. θ is drawn in the model's
parameter order for file sources and in arrival order for an iterator of ``(name, tensor)``.
Tensors from an iterator are taken over where their dtype and device already match (no copy, as
``load_state_dict(assign=True)`` does) for the dense parameters and buffers; a weight to quantize is
never written through (it is copied first when it would be).

Errors: unknown or duplicated keys, shape mismatches, non-floating weights and missing tensors raise a
``ValueError`` naming the key and what was expected. Nothing is written into the model until every
tensor has been read, checked and converted, so a failure leaves the model as it was (on the meta
device). For files, names and shapes come from the headers and are checked before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from resu.io.safetensors_reader import PathLike, Shards, is_path_like, shard_paths

Source = Union[PathLike, Iterable]


# ---------------------------------------------------------------------------------------------- targets
class _Slot:
    """One tensor of the model to fill: every place holding it, its meta shape/dtype, and its role."""

    def __init__(self, name: str, tensor: torch.Tensor, owners: list, is_buffer: bool, quantize: bool):
        self.name, self.tensor, self.owners, self.is_buffer, self.quantize = name, tensor, owners, is_buffer, quantize
        self.aliases = [f"{m}.{a}" if m else a for m, _, a in owners]


def _slots(model: nn.Module, filter_fn) -> list[_Slot]:
    """Every parameter and persistent buffer of ``model`` once (tied ones with all their names), in order."""

    def entries(module):
        for attr, p in module._parameters.items():
            if p is not None:
                yield attr, p, False
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                yield attr, b, True

    owners: dict[int, list] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, t, _ in entries(module):
            owners.setdefault(id(t), []).append((mod_name, module, attr))
    slots, seen = [], set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, t, is_buffer in entries(module):
            if id(t) in seen:
                continue
            seen.add(id(t))
            own = owners[id(t)]
            # sparsify_'s rule: a Linear weight, unless a non-Linear module shares it (a tied head)
            quantize = (
                not is_buffer
                and all(isinstance(m, nn.Linear) and a == "weight" for _, m, a in own)
                and (filter_fn is None or filter_fn(mod_name, module))
            )
            slots.append(_Slot(f"{mod_name}.{attr}" if mod_name else attr, t, own, is_buffer, quantize))
    return slots


def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------- conversion
class _Converter:
    """Turns one dense tensor from the checkpoint into what the model will hold (a QRESU weight or a copy)."""

    def __init__(self, entry, spec, fmt, epsilon, generator, selective, device):
        self.entry, self.spec, self.fmt = entry, spec, fmt
        self.epsilon, self.generator, self.selective, self.device = epsilon, generator, selective, device
        self.trim = _malloc_trim()

    def target_device(self, slot: _Slot) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cpu") if slot.tensor.device.type == "meta" else slot.tensor.device

    @torch.no_grad()
    def __call__(self, slot: _Slot, value: torch.Tensor, owned: bool):
        """``owned``: the tensor was read for this call (a file's); otherwise the caller may still use it."""
        converted = value.to(device=self.target_device(slot), dtype=slot.tensor.dtype)
        if slot.is_buffer:
            return converted
        if not slot.quantize:
            return nn.Parameter(converted, requires_grad=slot.tensor.requires_grad)
        if not owned and converted.data_ptr() == value.data_ptr():
            converted = converted.clone()  # pruning zeroes slots in place: never through the caller's tensor
        del value
        return self._qresu(slot, converted)

    def _qresu(self, slot: _Slot, weight: torch.Tensor) -> nn.Parameter:
        from resu.api.prune import method_result
        from resu.api.theta_phase import initial_theta
        from resu.tensors.quantized import QuantizedState, quantize_active
        from resu.tensors.resu_parameter import ResuParameter

        # The same steps, in the same order, as sparsify_ → prune_ → enter_qresu_ on one weight.
        p = nn.Parameter(ResuParameter.from_weight(weight), requires_grad=slot.tensor.requires_grad)
        del weight  # p holds the only reference: it goes when the codes replace it below
        result = method_result(self.entry, slot.name, p, None, self.spec)
        p._apply_pruning_(result.pruned)
        if result.weight is not None:
            p.copy_(result.weight)
        del result
        qdata, scale, zero = quantize_active(p.effective_weight(), ~p.active_mask, self.fmt)
        theta = initial_theta(p, self.epsilon, self.generator).to(p.dtype)
        p._enter_qresu_(QuantizedState(qdata, scale, zero, theta, self.fmt))
        p._selective = self.selective
        if p.device.type == "cpu" and self.trim is not None:
            # glibc serves a freed large block's size from its heap afterwards, so the next layer's
            # temporaries land between long-lived codes and θ; without handing those holes back, the
            # resident set grows by several dense layers over a model (measured: 2x the QRESU size).
            self.trim(0)
        return p


def _check_value(slot: _Slot, key: str, shape: tuple, value: Optional[torch.Tensor] = None) -> None:
    if tuple(shape) != tuple(slot.tensor.shape):
        raise ValueError(f"load_quantized_: `{key}` has shape {tuple(shape)} in the checkpoint but "
                         f"{tuple(slot.tensor.shape)} in the model; the checkpoint is for another configuration")
    if value is not None and slot.quantize and not value.is_floating_point():
        raise ValueError(f"load_quantized_: `{key}` has dtype {value.dtype} in the checkpoint; a weight to quantize "
                         "must be floating-point")


def _missing_error(missing: list[str]) -> ValueError:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    return ValueError(f"load_quantized_: the checkpoint has no tensor for {shown}; the model is left unchanged")


def _unexpected_error(unexpected: list[str]) -> ValueError:
    shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
    return ValueError(f"load_quantized_: the checkpoint has tensors the model does not: {shown}; the model is left "
                      "unchanged (load into the model the checkpoint was saved from)")


def _load_files(files: Shards, slots: list[_Slot], convert: _Converter) -> dict:
    by_alias = {a: s for s in slots for a in s.aliases}
    unexpected = [k for k in files.keys() if k not in by_alias]
    if unexpected:
        raise _unexpected_error(unexpected)
    keys = set(files.keys())
    chosen = {}
    for slot in slots:
        key = next((a for a in slot.aliases if a in keys), None)
        if key is None:
            continue
        _check_value(slot, key, files.shape(key))
        chosen[slot.name] = key
    _check_complete(slots, chosen)
    staged = {}
    for slot in slots:  # the model's order: θ is drawn in the same order as enter_qresu_ draws it
        if slot.name in chosen:
            value = files.get(chosen[slot.name])
            _check_value(slot, chosen[slot.name], value.shape, value)
            staged[slot.name] = convert(slot, value, owned=True)
            del value
    return staged


def _load_stream(items: Iterable, slots: list[_Slot], convert: _Converter) -> dict:
    by_alias = {a: s for s in slots for a in s.aliases}
    staged, chosen = {}, {}
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise ValueError("load_quantized_: an iterator source must yield (name, tensor) pairs, "
                             f"got {type(item).__name__}") from None
        slot = by_alias.get(key)
        if slot is None:
            raise _unexpected_error([str(key)])
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"load_quantized_: `{key}` is a {type(value).__name__}, not a tensor")
        if slot.name in chosen:
            # A state_dict names a tied tensor under each alias: the copies must agree.
            if key == chosen[slot.name] or slot.quantize or not torch.equal(
                    staged[slot.name].detach().cpu(), value.to(slot.tensor.dtype).cpu()):
                raise ValueError(f"load_quantized_: `{key}` arrives twice (also as `{chosen[slot.name]}`), "
                                 "with values that may differ; give each tensor once")
            continue
        _check_value(slot, key, value.shape, value)
        chosen[slot.name] = key
        staged[slot.name] = convert(slot, value, owned=False)
        del value, item
    _check_complete(slots, chosen)
    return staged


def _check_complete(slots: list[_Slot], chosen: dict) -> None:
    # Only tensors still on the meta device need the checkpoint; real ones (buffers built outside
    # init_empty_weights, say) keep their values.
    missing = [s.name for s in slots if s.name not in chosen and s.tensor.device.type == "meta"]
    if missing:
        raise _missing_error(missing)


def load_quantized_(
    model: nn.Module,
    source: Source,
    sparsity: float,
    *,
    method: str = "magnitude",
    scope: str = "row",
    pattern: Optional[str] = None,
    bits: int = 4,
    scheme: str = "per_channel",
    group_size: Optional[int] = None,
    double_quant: bool = False,
    epsilon: float = 0.1,
    generator: Optional[torch.Generator] = None,
    selective=None,
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Load a checkpoint into ``model`` (built on the meta device) with its Linear weights straight in QRESU.

    Equivalent to loading the dense checkpoint, then ``resu.sparsify_(model, filter_fn)``,
    ``resu.prune_(model, sparsity, method, scope, pattern=pattern)`` and ``resu.enter_qresu_(model, bits,
    scheme, group_size, epsilon, double_quant=..., generator=..., selective=...)``, but one weight at a
    time: only one dense weight is in memory at once (see the module docstring for what is read when).

    Args:
        model: a plain model (no ResuParameters), typically built under ``torch.device("meta")`` or
            ``accelerate.init_empty_weights()``. Its parameters' dtypes are the dtypes loaded.
        source: a safetensors file, a list of shard files, a folder (with ``model.safetensors.index.json``
            or ``*.safetensors`` files), or an iterable of ``(name, tensor)`` pairs (a state_dict's
            ``items()``, a generator). Keys are the model's ``state_dict`` names (any alias of a tied one).
        sparsity: fraction of each quantized weight to prune, in [0, 1].
        method: a registered prune method that needs no calibration data (``"magnitude"``,
            ``"random"``, ...), applied to one weight at a time.
        scope: ``"row"`` or ``"global"`` (within each weight matrix).
        pattern: ``"N:M"`` semi-structured sparsity, as for :func:`resu.prune_`.
        bits, scheme, group_size, double_quant, epsilon, generator, selective: as for
            :func:`resu.enter_qresu_` (``generator`` also drives ``method="random"``).
        filter_fn: ``filter_fn(qualified_name, module) -> bool`` picks the Linear layers to quantize, as
            for :func:`resu.sparsify_`; the others load dense.
        device: where the loaded tensors go (default: the CPU for meta tensors).

    Returns:
        ``model`` itself, its selected Linear weights ResuParameters in QRESU mode.

    Raises:
        ValueError: bad arguments; a model that already has ResuParameters or no Linear weight to
            quantize; checkpoint keys the model does not have, tensors the checkpoint lacks, shape
            mismatches, a non-floating weight. The model is left unchanged.
    """
    from resu.api.prune import _check_pattern_sparsity
    from resu.api.theta_phase import check_selective
    from resu.api.validation import check_choice, check_fraction, check_generator, check_int, check_nonnegative
    from resu.prune.registry import PRUNE_METHODS, PruneSpec, parse_pattern
    from resu.tensors.quantized import SCHEME_TABLE, QuantFormat, check_format
    from resu.tensors.resu_parameter import ResuParameter

    caller = "load_quantized_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: `model` must be an nn.Module, got {type(model).__name__}")
    sparsity = check_fraction(sparsity, "sparsity", caller)
    entry = PRUNE_METHODS.get(method, caller, "method")
    if entry.statistic is not None:
        raise ValueError(f"{caller}: method={method!r} needs calibration data, which a weight-by-weight load cannot "
                         "give; use method='magnitude', or load densely and call resu.prune_ with calib=...")
    check_choice(scope, "scope", ("row", "global"), caller)
    check_generator(generator, caller)
    spec = PruneSpec(sparsity, scope, parse_pattern(pattern, caller), generator)
    _check_pattern_sparsity(spec)
    check_int(bits, "bits", caller, choices=(4, 8))
    check_format(bits, scheme, 1 if group_size is None else group_size, caller, double_quant)
    group_size = SCHEME_TABLE[scheme].default_group_size if group_size is None else group_size
    check_int(group_size, "group_size", caller, minimum=1)
    fmt = QuantFormat(bits, scheme, group_size, double_quant)
    epsilon = check_nonnegative(epsilon, "epsilon", caller)
    check_selective(selective, caller)

    if any(isinstance(p, ResuParameter) for p in model.parameters()):
        raise ValueError(f"{caller}: `model` already has ResuParameters; build a plain model (on the meta device)")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # a Hugging Face model's declared ties (init_empty_weights builds them untied)
    _check_no_meta_leftovers(model)
    slots = _slots(model, filter_fn)
    targets = [s for s in slots if s.quantize]
    if not targets:
        raise ValueError(f"{caller}: `model` has no nn.Linear weight to quantize (check filter_fn)")
    if spec.pattern is not None:
        for s in targets:
            if s.tensor.shape[-1] % spec.pattern[1]:
                raise ValueError(f"{caller}: pattern {pattern!r} needs in_features divisible by {spec.pattern[1]}, "
                                 f"but `{s.name}` has shape {tuple(s.tensor.shape)}; exclude it with filter_fn")

    convert = _Converter(entry, spec, fmt, epsilon, generator, selective, device)
    if is_path_like(source):
        staged = _load_files(Shards(shard_paths(source)), slots, convert)
    elif isinstance(source, Mapping):
        staged = _load_stream(source.items(), slots, convert)
    elif isinstance(source, Iterable):
        staged = _load_stream(source, slots, convert)
    else:
        raise ValueError(f"{caller}: `source` must be a path, a list of paths or an iterable of (name, tensor) "
                         f"pairs, got {type(source).__name__}")

    # Everything is read and converted: only now does the model change.
    for slot in slots:
        if slot.name in staged:
            new = staged.pop(slot.name)
            for _, module, attr in slot.owners:
                (module._buffers if slot.is_buffer else module._parameters)[attr] = new
    _finish_like_sparsify(model)
    return model


def _check_no_meta_leftovers(model: nn.Module) -> None:
    # A non-persistent buffer is never in a checkpoint: on the meta device it would stay without values.
    stuck = [f"{m}.{a}" if m else a for m, module in model.named_modules() for a, b in module._buffers.items()
             if b is not None and b.device.type == "meta" and a in module._non_persistent_buffers_set]
    if stuck:
        raise ValueError(
            f"load_quantized_: the buffers {', '.join(stuck)} are on the meta device and no checkpoint holds them "
            "(they are not persistent); build the model with accelerate.init_empty_weights(), which keeps buffers "
            "real, instead of under torch.device('meta')"
        )


def _finish_like_sparsify(model: nn.Module) -> None:
    """What :func:`resu.sparsify_` attaches to a model: load_state_dict checks, and HF checkpointing."""
    from resu.tensors.load_checks import register_load_checks

    register_load_checks(model)
    if callable(getattr(type(model), "save_pretrained", None)):
        from resu.io.hf_checkpointing import attach_hf_checkpointing

        attach_hf_checkpointing(model)


__all__ = ["load_quantized_"]
