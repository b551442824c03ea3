"""The steady-state training step builds no tensor from host data.

``torch.tensor(values, device=cuda)`` copies from pageable host memory, which makes the CPU wait for
every kernel already queued: in a backward pass (FSDP2's gradient copy-in and reduce-scatter decode
masks there) that wait stops communication overlapping compute. On CPU there is no such wait to
observe, but every such constant goes through ``aten.lift_fresh``, which a dispatch mode sees.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import resu
from resu.tensors import mask_kernels as mask_ops
from resu.tensors.compact_grad import CompactGrad


class _HostConstants(TorchDispatchMode):
    """Records every tensor built from host data (``torch.tensor`` / ``as_tensor`` of Python values)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("encoding", list(mask_ops.MaskEncoding))
def test_mask_decoding_builds_no_host_constant(encoding):
    n = 1000
    pruned = torch.rand(n, generator=torch.Generator().manual_seed(0)) < (0.01 if encoding is not mask_ops.MaskEncoding.BITMAP else 0.5)
    if encoding is mask_ops.MaskEncoding.ACTIVE_INDICES:
        pruned = ~pruned
    storage = mask_ops._encode_as(pruned, encoding)
    k = int(pruned.sum())
    values = torch.randn(n)
    with _HostConstants() as mode:
        flags = mask_ops.pruned_bool(storage, encoding, n, k)
        gathered = mask_ops.gather_pruned(values, storage, encoding, n, k)
        scattered = mask_ops.scatter_pruned(torch.zeros(n), gathered, storage, encoding, n, k)
    assert mode.seen == []
    assert torch.equal(flags, pruned)
    assert torch.equal(scattered, torch.where(pruned, values, 0.0))


@pytest.mark.parametrize("mode_name", ["resu", "qresu"])
def test_training_step_builds_no_host_constant(mode_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    if mode_name == "resu":
        resu.enter_resu_(model, epsilon=0.1)
    else:
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=8, epsilon=0.1)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 16), torch.randn(4, 8)

    def step():
        F.mse_loss(model(x), y).backward()
        grads = [p.grad for p in model.parameters() if isinstance(p, resu.ResuParameter)]
        dense = [g.to_dense() for g in grads if isinstance(g, CompactGrad)]  # FSDP2's reduce-scatter copy-in
        opt.step()
        opt.zero_grad()
        return dense

    step()  # the first step creates the optimizer states
    with _HostConstants() as mode:
        dense = step()
    assert mode.seen == []
    assert len(dense) == 2 and all(d.shape == p.shape for d, p in zip(dense, (model[0].weight, model[2].weight)))
