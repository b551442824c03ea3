"""Row shards, the FSDP2 all-gather hooks and the DCP canonical form, in one process (no process group).

The spawned FSDP2 tests use shapes whose shards fill whole bytes; these check every mode and
quantization format on shapes that do not (odd columns, 3 ranks), where the gathered masks and
packed codes are reassembled rather than viewed.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy

import resu
from resu.distributed.dcp import canonical_entries, pack_mask_rows, resu_from_canonical, unpack_mask_rows
from resu.distributed.fsdp import post_all_gather, row_slices

CASES = [
    ("sparse", {}), ("resu", {}),
    ("qresu", dict(bits=4, scheme="per_group", group_size=2)),
    ("qresu", dict(bits=4, scheme="per_tensor")),
    ("qresu", dict(bits=8, scheme="per_channel")),
]


def weight(mode: str, quant: dict, rows: int, cols: int, seed: int) -> resu.ResuParameter:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    resu.sparsify_(layer)
    resu.prune_(layer, 0.4, method="random", generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    if mode == "resu":
        resu.enter_resu_(layer, epsilon=0.5, generator=gen)
    elif mode == "qresu":
        resu.enter_qresu_(layer, epsilon=0.5, generator=gen, **quant)
    return layer.weight


def gathered(shards: list) -> tuple:
    """What FSDP2's all-gather hands ``fsdp_post_all_gather``: each input laid end to end over ranks."""
    per_rank = [s.fsdp_pre_all_gather(None, None, None, None, MixedPrecisionPolicy()) for s in shards]
    outputs = []
    for i, first in enumerate(per_rank[0][0]):
        flat = torch.cat([inputs[i].reshape(-1) for inputs, _ in per_rank])
        outputs.append(flat.view(-1, *first.shape[1:]))
    return tuple(outputs), per_rank[0][1]


@pytest.mark.parametrize("mode,quant", CASES)
@pytest.mark.parametrize("rows,cols,world", [(6, 5, 2), (6, 7, 3), (8, 4, 2)])
def test_shards_gather_back_to_the_weight(mode, quant, rows, cols, world):
    p = weight(mode, quant, rows, cols, seed=rows * cols + world)
    step = rows // world
    shards = row_slices(p, [(r * step, (r + 1) * step) for r in range(world)])
    assert sum(s.n_pruned for s in shards) == p.n_pruned
    assert all(s.mode is p.mode and s.resu_layout.encoding.value == "bitmap" for s in shards)
    assert torch.equal(torch.cat([s.effective_weight() for s in shards]), p.effective_weight())
    assert torch.equal(torch.cat([s.active_mask for s in shards]), p.active_mask)

    # FSDP2 picks the hook's calling convention by its signature: the five-argument one.
    assert list(inspect.signature(shards[0].fsdp_pre_all_gather).parameters) == ["mesh", "outer_size", "outer_stride", "module", "mp_policy"]
    outputs, metadata = gathered(shards)
    full, owned = post_all_gather(shards[0], outputs, metadata, p.dtype)
    assert isinstance(full, resu.ResuParameter) and full.shape == p.shape and full.mode is p.mode
    assert torch.equal(full.effective_weight(), p.effective_weight())
    assert torch.equal(full.active_mask, p.active_mask)
    if mode == "qresu":  # packed codes travel, not a dense weight
        assert outputs[0].dtype == torch.uint8 and not any(t.is_floating_point() and t.numel() >= p.numel() for t in outputs)

    # A later all-gather into the same full weight (FSDP2's `out=`) takes the new values.
    for s in shards:
        if mode == "qresu":
            s._theta.add_(1.0)
        else:
            s._weight.add_(1.0)
    expected = torch.cat([s.effective_weight() for s in shards])
    outputs, metadata = gathered(shards)
    assert post_all_gather(shards[0], outputs, metadata, p.dtype, out=full) is None
    assert torch.equal(full.effective_weight(), expected)


@pytest.mark.parametrize("mode,quant", CASES)
def test_canonical_form_round_trips(mode, quant):
    p = weight(mode, quant, rows=6, cols=5, seed=3)
    entries = canonical_entries(p)
    assert entries[".resu_mask"].shape == (6, 1)
    layout = {k: v for k, v in p.resu_layout.to_dict().items() if k in ("mode", "qformat", "selective", "write_policy")}
    back = resu_from_canonical(entries, layout, p.shape)
    assert back.mode is p.mode and back.n_pruned == p.n_pruned
    assert torch.equal(back.effective_weight(), p.effective_weight())
    assert torch.equal(back.active_mask, p.active_mask)


def test_mask_rows_pack_and_unpack():
    g = torch.Generator().manual_seed(0)
    for cols in (1, 7, 8, 9, 17):
        pruned = torch.rand(5, cols, generator=g) < 0.4
        packed = pack_mask_rows(pruned)
        assert packed.shape == (5, -(-cols // 8)) and packed.dtype == torch.uint8
        assert torch.equal(unpack_mask_rows(packed, cols), pruned)


@pytest.mark.parametrize("mode,quant", [("resu", {}), ("qresu", dict(bits=4, scheme="per_channel"))])
def test_copying_equal_values_into_a_resu_weight_changes_nothing_and_other_values_are_refused(mode, quant):
    # DDP's initial broadcast copies each replica's own (equal) values back: allowed, a no-op. Any
    # other dense values would move frozen weights: refused as before, naming broadcast_module_.
    p = weight(mode, quant, rows=6, cols=5, seed=1)
    inner = {name: t.clone() for name, t in p._inner().items()}
    with torch.no_grad():
        p.copy_(p.effective_weight().clone())
    assert all(torch.equal(t, getattr(p, name)) for name, t in inner.items())
    with pytest.raises(RuntimeError, match="broadcast_module_"), torch.no_grad():
        p.copy_(p.effective_weight() + 1.0)
    assert all(torch.equal(t, getattr(p, name)) for name, t in inner.items())
