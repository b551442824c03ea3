"""A greedy generation smoke check: does the (pruned) model still say something sensible?"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, *, chat: bool = False) -> str:
    """Greedy continuation of ``prompt`` (only the new text is returned).

    A plain loop over full forwards, without a key/value cache: slow for long outputs, but it needs
    nothing from the model beyond ``model(ids)`` returning logits, so it works with ResuParameters in
    any mode. Stops at the tokenizer's end-of-sequence token.

    Args:
        model: a causal LM (Hugging Face or any module returning logits or an output with ``.logits``).
        tokenizer: a Hugging Face tokenizer.
        prompt: the text to continue.
        max_new_tokens: at most this many tokens are generated (≥ 1).
        chat: wrap ``prompt`` as a user message with the tokenizer's chat template (instruct models).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_text: `max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"].to(device)
    start = ids.shape[1]
    eos = tokenizer.eos_token_id
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for _ in range(max_new_tokens):
            out = model(ids)
            logits = out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id.to(ids.dtype)], dim=1)
            if eos is not None and int(next_id) == eos:
                break
    finally:
        for m, flag in flags.items():
            m.training = flag
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)
