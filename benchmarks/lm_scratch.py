"""A byte-level Llama-style language model trained from scratch, for GPU runs of the recovery benchmark.

The pretrained SmolLM2 checkpoint is too large to ship to a GPU machine without a package registry,
so the GPU comparison first trains its own dense model on the same text (the Python standard
library's sources), then prunes and recovers it exactly as the CPU run does with SmolLM2.

Bytes are the tokens (vocabulary 256), so no tokenizer file is needed anywhere.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch

SIZES = {
    # name: (hidden, layers, heads, intermediate) — parameter counts without the 256-entry embedding
    "tiny": (64, 2, 4, 176),  # ~0.1M, for tests and smoke runs
    "small": (512, 8, 8, 1408),  # ~25M
    "base": (768, 12, 12, 2048),  # ~85M
}


def byte_tokens(texts: list[str]) -> torch.Tensor:
    """One long int64 tensor of the UTF-8 bytes of ``texts``, separated by a newline."""
    data = "\n".join(texts).encode("utf-8", errors="replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def build_model(size: str = "small", seq_len: int = 512):
    """A ``LlamaForCausalLM`` with a 256-token vocabulary, untied head, SwiGLU, RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def random_windows(tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of ``batch`` random windows of ``seq_len`` tokens."""
    high = tokens.numel() - seq_len
    while True:
        starts = torch.randint(0, high, (batch,), generator=generator)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def train_from_scratch(
    model,
    tokens: torch.Tensor,
    *,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cuda",
    log=print,
):
    """Train ``model`` (dense) with AdamW, cosine decay after a 5% warm-up, bf16 autocast on CUDA."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    batches = random_windows(tokens, batch, seq_len, gen)
    start = time.time()
    for step in range(steps):
        x = next(batches).to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  scratch step {step + 1}/{steps}  loss {loss.item():.3f}  bpb {loss.item() / math.log(2):.3f}  {time.time() - start:.0f}s")
    model.eval()
    return model
