"""Perplexity of a causal language model over token batches."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _token_ids(batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(input_ids, attention_mask or None) of a batch: a (batch × seq) tensor, or a dict with ``input_ids``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    raise TypeError(
        f"perplexity: a batch must be a (batch × seq) tensor of token ids or a dict with 'input_ids', got "
        f"{type(batch).__name__}; pass forward_fn=(model, batch) -> (logits, input_ids) for other layouts"
    )


def _default_forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    ids, attention = _token_ids(batch)
    out = model(ids) if attention is None else model(input_ids=ids, attention_mask=attention)
    logits = out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
    return logits, ids, attention


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
) -> float:
    """exp(mean next-token negative log-likelihood) of ``model`` over ``batches``.

    Every position but the last predicts the next token; the mean is over all predicted tokens of all
    batches (sum of NLL / token count), so batches of different sizes weigh by their tokens. Works
    with ResuParameters in any mode (DENSE, SPARSE, RESU, QRESU): it only runs forwards.

    Args:
        model: a causal LM returning logits (batch × seq × vocab) as a tensor, a tuple's first entry,
            or an output's ``.logits`` (Hugging Face).
        batches: (batch × seq) tensors of token ids, or dicts with ``input_ids`` (and optionally
            ``attention_mask``: positions with 0 are neither predicted nor counted).
        forward_fn: ``forward_fn(model, batch) -> logits`` for other batch layouts; the batch's token ids
            are then read as above.

    Returns:
        The perplexity (a float). The model runs in eval mode and gets its train/eval flags back.

    Raises:
        ValueError: when ``batches`` holds no predicted token.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in batches:
            if forward_fn is None:
                logits, ids, attention = _default_forward(model, batch)
            else:
                logits = forward_fn(model, batch)
                ids, attention = _token_ids(batch)
            targets = ids[:, 1:].to(logits.device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            if attention is not None:
                # a target counts when both it and the position predicting it are real tokens
                keep = (attention[:, 1:] * attention[:, :-1]).to(logits.device).reshape(-1).bool()
                nll = nll[keep]
            total_nll += float(nll.double().sum())
            total_tokens += nll.numel()
    finally:
        for m, flag in flags.items():
            m.training = flag
    if total_tokens == 0:
        raise ValueError("perplexity: `batches` held no predicted token; pass batches of at least 2 tokens per row")
    return math.exp(total_nll / total_tokens)
