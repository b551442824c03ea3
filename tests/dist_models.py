"""Tiny models and data for the distributed tests (every weight's rows divide evenly over 2 ranks)."""

from __future__ import annotations

import torch
import torch.nn as nn

import resu

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


def tiny_model(mode: str, seed: int = 0, unused: bool = False) -> nn.Module:
    """A 2-layer MLP (:class:`Mlp`) in ``mode``, pruned to 50%."""
    torch.manual_seed(seed)
    model = Mlp(unused)
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    gen = torch.Generator().manual_seed(seed)
    if mode in ("resu", "selective"):
        selective = resu.SelectionConfig(k_select_ratio=0.5, tau_stable=0.0) if mode == "selective" else None
        resu.enter_resu_(model, epsilon=0.5, generator=gen, selective=selective)
    elif mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, epsilon=0.5, generator=gen)
    return model


def batches(steps: int, batch: int = 8, seed: int = 1) -> list:
    """``steps`` global (x, y) regression batches; rank r of 2 takes rows ``r::2``."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(steps)]


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
