"""Tiny models and data for the distributed tests (every weight's rows divide evenly over 2 ranks)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from dist_spawn import device

MODES = ("sparse", "resu", "qresu", "selective")


class Mlp(nn.Module):
    """8 → 16 → 4; ``spare`` (if any) is a Linear the forward never calls."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.spare = nn.Linear(8, 4) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def tiny_model(mode: str, seed: int = 0, unused: bool = False, select_ratio: float = 0.5) -> nn.Module:
    """A 2-layer MLP (:class:`Mlp`) in ``mode``, pruned to 50%, on this rank's device.

    ``select_ratio``: the RESU-Selective screen and select ratios ("selective" mode); 1.0 leaves only
    the elementwise consistency test."""
    torch.manual_seed(seed)
    model = Mlp(unused)
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    gen = torch.Generator().manual_seed(seed)
    if mode in ("resu", "selective"):
        selective = resu.SelectionConfig(k_screen_ratio=select_ratio, k_select_ratio=select_ratio, tau_stable=0.3) if mode == "selective" else None
        resu.enter_resu_(model, epsilon=0.5, generator=gen, selective=selective)
    elif mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, epsilon=0.5, generator=gen)
    return model.to(device())


def batches(steps: int, batch: int = 8, seed: int = 1) -> list:
    """``steps`` global (x, y) regression batches on this rank's device (drawn on the CPU, so every
    backend sees the same numbers); rank r of 2 takes rows ``r::2``."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g).to(device()), torch.randn(batch, 4, generator=g).to(device())) for _ in range(steps)]


def frozen_parts(model: nn.Module) -> dict:
    """What a RESU/QRESU step must leave bitwise unchanged: active values, or the packed codes and scales."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter) and p.mode is resu.ResuMode.RESU:
            out[name] = [p.effective_weight()[p.active_mask].clone()]
        elif isinstance(p, resu.ResuParameter) and p.mode is resu.ResuMode.QRESU:
            out[name] = [p._qdata.clone(), p._qscale.clone(), p._qzero.clone(), p._mask_storage.clone()]
    return out


def assert_frozen(before: dict, model: nn.Module) -> None:
    after = frozen_parts(model)
    for name, parts in before.items():
        for a, b in zip(parts, after[name]):
            assert torch.equal(a, b), f"{name}: a frozen part moved"


def reference(mode: str, data: list, micro: int = 1, unused: bool = False, steps=None, select_ratio=0.5) -> nn.Module:
    """Rank 0's model (seed 0) trained in one process on the whole (concatenated) batches; with
    ``micro`` > 1 each batch is split into micro-batches as the distributed run splits it."""
    model = tiny_model(mode, seed=0, unused=unused, select_ratio=select_ratio)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in data[:steps]:
        for k in range(micro):
            rows = slice(None) if micro == 1 else [i for i in range(len(x)) if (i // 2) % micro == k]
            F.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()
    return model


def effective(p: torch.Tensor) -> torch.Tensor:
    """The dense weight a parameter (ResuParameter or plain) computes with."""
    return p.effective_weight() if isinstance(p, resu.ResuParameter) else p.detach()


def assert_close_to(weights: dict, model: nn.Module, what: str, rtol=1e-5, atol=1e-6) -> None:
    """``weights`` (name -> dense tensor) match ``model``'s effective weights."""
    for name, p in model.named_parameters():
        torch.testing.assert_close(weights[name], effective(p), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {name}: {m}")
