"""Decoder blocks of a model, and the inputs that reach the first one.

Block-by-block calibration needs two things from a model: the list of its repeated blocks (a
Hugging Face Llama/Qwen2 ``model.model.layers``, a GPT-2 ``model.transformer.h``, ...), and the
arguments the first block receives for each calibration batch. Both are found without knowing the
architecture: the blocks are the longest ``nn.ModuleList`` of same-type modules, and the first
block's arguments are captured by a forward pre-hook that stops the forward right there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

BlocksArg = Union[None, str, nn.ModuleList, list]


def find_blocks(model: nn.Module, blocks: BlocksArg = None) -> Optional[list[nn.Module]]:
    """The model's decoder blocks, in forward order, or None when there are no repeated blocks.

    Args:
        model: any module.
        blocks: override: a module path such as ``"model.layers"`` (resolved with
            ``model.get_submodule``), or the blocks themselves (an ``nn.ModuleList`` or list of modules).

    Without an override, the longest ``nn.ModuleList`` (at least 2 entries) whose entries all have the
    same type and hold parameters is taken; ties go to the first one found.
    """
    if isinstance(blocks, str):
        try:
            found = model.get_submodule(blocks)
        except AttributeError as exc:
            raise ValueError(f"blocks={blocks!r} is not a submodule path of this model ({exc})") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"blocks={blocks!r} names a {type(found).__name__}; it must name an nn.ModuleList of blocks")
        return list(found)
    if blocks is not None:
        found = list(blocks)
        if not found or not all(isinstance(b, nn.Module) for b in found):
            raise ValueError("blocks must be a module path, an nn.ModuleList, or a non-empty list of modules")
        return found
    best: Optional[nn.ModuleList] = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(b) for b in module}) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if best is None or len(module) > len(best):
            best = module
    return None if best is None else list(best)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockInputs:
    """One calibration batch's arguments to a block: ``args`` (the hidden states first, when
    positional) and ``kwargs`` (attention mask, position ids/embeddings, ...)."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        if self.args:
            return BlockInputs((hidden,) + tuple(self.args[1:]), self.kwargs)
        return BlockInputs(self.args, {**self.kwargs, "hidden_states": hidden})


def _is_cache(value: Any) -> bool:
    # A key/value cache object (transformers' Cache classes) would grow on every replay of a block.
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def _without_cache(inputs: BlockInputs) -> BlockInputs:
    args = tuple(None if _is_cache(a) else a for a in inputs.args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in inputs.kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return BlockInputs(args, kwargs)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    calib: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any],
) -> list[BlockInputs]:
    """Run every calibration batch through ``model`` up to ``first_block`` and return its inputs.

    The forward is stopped by an exception as soon as the block is reached, so nothing after it runs.
    The model's config ``use_cache`` (when it has one) is off during the capture, and any cache object
    among the captured arguments is replaced by None, so the block can be replayed on the same inputs.
    """
    captured: list[BlockInputs] = []

    def hook(module, args, kwargs):
        captured.append(_without_cache(BlockInputs(tuple(args), dict(kwargs))))
        raise _StopForward

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib:
            try:
                forward_fn(model, batch)
            except _StopForward:
                continue
            raise RuntimeError(
                "a calibration batch ran the whole model without reaching the first block; pass blocks=... "
                "naming the blocks this forward uses"
            )
    finally:
        handle.remove()
        if use_cache is not None:
            config.use_cache = use_cache
    if not captured:
        raise ValueError("`calib` yielded no batches; pass at least one calibration batch")
    return captured


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns: the output itself, or the first entry of a tuple/list."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a block returned {type(output).__name__}; expected hidden states (a tensor or a tuple starting with one)")
    return output
