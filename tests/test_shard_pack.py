"""The compact reduce-scatter's Triton exchange (interpreter) against its torch reference, and against
what it must compute: each rank's chunk of the summed gradients at trainable slots, zeros elsewhere."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

import resu
from resu.compile import registry
from resu.distributed.reduce_scatter import CompactReduceScatter

WORLD = 2


def _group():
    """Stand-ins for FSDP2's params of one group: RESU, SPARSE and QRESU weights, and plain ones
    (one padded: 5 elements over 2 ranks)."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32, bias=False) for _ in range(3)]
    for layer, mode, sparsity in zip(layers, ("resu", "sparse", "qresu"), (0.5, 0.3, 0.6)):
        resu.sparsify_(layer)
        resu.prune_(layer, sparsity)
        if mode == "resu":
            resu.enter_resu_(layer, epsilon=0.1)
        elif mode == "qresu":
            resu.enter_qresu_(layer, bits=4, scheme="per_group", group_size=8, epsilon=0.1)
    fulls = [layers[0].weight, torch.zeros(32), layers[1].weight, torch.zeros(5), layers[2].weight]
    sizes = [256, 16, 256, 3, 256]
    return [types.SimpleNamespace(_unsharded_param=f, padded_sharded_param_size=torch.Size([n])) for f, n in zip(fulls, sizes)]


def _run(comm, rank, data, kernels, monkeypatch):
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: kernels)
    out = torch.full((data.numel() // WORLD,), float("nan"))
    # Every rank holds the same gradients here, so the reduce-scatter gives WORLD × this rank's row.
    comm.exchange(out, data, WORLD, rank, lambda recv, send: recv.copy_(send.view(WORLD, -1)[rank] * WORLD))
    return out, comm.last_sent


@pytest.mark.parametrize("rank", range(WORLD))
def test_triton_exchange_matches_the_reference(rank, monkeypatch):
    params = _group()
    data = torch.randn(WORLD * sum(fp.padded_sharded_param_size.numel() for fp in params),
                       generator=torch.Generator().manual_seed(rank))
    want, sent_ref = _run(CompactReduceScatter(params), rank, data, False, monkeypatch)
    comm = CompactReduceScatter(params)
    got, sent = _run(comm, rank, data, True, monkeypatch)
    assert comm._plan is not None  # the Triton path ran
    assert torch.equal(got, want) and sent == sent_ref
    again, _ = _run(comm, rank, data * 3, True, monkeypatch)  # the cached plan, new buffers
    assert torch.equal(again, _run(CompactReduceScatter(params), rank, data * 3, False, monkeypatch)[0])
    # What it must be: WORLD x the rank's chunk at trainable slots (pruned for RESU/QRESU, active for SPARSE), 0 elsewhere.
    chunk = data.view(WORLD, -1)[rank]
    start = 0
    for fp in params:
        n, full = fp.padded_sharded_param_size.numel(), fp._unsharded_param
        piece, expect = got[start: start + n], chunk[start: start + n] * WORLD
        if isinstance(full, resu.ResuParameter):
            pruned = ~full.active_mask.reshape(-1)[rank * n: (rank + 1) * n]
            keep = pruned if full.mode.trains_theta else ~pruned
            expect = torch.where(keep, expect, 0.0)
        assert torch.equal(piece, expect)
        start += n


def test_index_encoded_masks_take_the_reference(monkeypatch):
    params = _group()
    layer = nn.Linear(16, 32, bias=False)
    resu.sparsify_(layer)
    resu.prune_(layer, 0.01)  # few pruned slots: an index-encoded mask
    assert layer.weight.resu_layout.encoding is not resu.tensors.mask_kernels.MaskEncoding.BITMAP
    params[0] = types.SimpleNamespace(_unsharded_param=layer.weight, padded_sharded_param_size=torch.Size([256]))
    data = torch.randn(WORLD * sum(fp.padded_sharded_param_size.numel() for fp in params))
    comm = CompactReduceScatter(params)
    got, _ = _run(comm, 0, data, True, monkeypatch)
    assert comm._plan is None
    assert torch.equal(got, _run(CompactReduceScatter(params), 0, data, False, monkeypatch)[0])
