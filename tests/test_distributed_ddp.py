"""DDP (gloo, 2 CPU processes) with ResuParameters in every mode: broadcast, compact all-reduce, options.

One spawned run does every check: starting processes dominates the cost.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import resu
from resu.distributed import CompactAllReduceState, compact_allreduce_hook, wrap_ddp
from dist_models import MODES, assert_close_to, assert_frozen, batches, effective, frozen_parts, reference, tiny_model
from dist_spawn import run_spawned

STEPS = 3


def _train(ddp, model, rank: int, data: list, micro: int = 1) -> None:
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in data:
        mine = [i for i in range(len(x)) if i % 2 == rank]
        for k in range(micro):
            rows = mine if micro == 1 else [i for i in mine if (i // 2) % micro == k]
            if k < micro - 1:
                with ddp.no_sync():
                    F.mse_loss(ddp(x[rows]), y[rows]).backward()
            else:
                F.mse_loss(ddp(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()


def _assert_matches(model, reference_model, what: str) -> None:
    assert_close_to({n: effective(p) for n, p in model.named_parameters()}, reference_model, what)


def _assert_replicas_equal(model, what: str) -> None:
    for name, p in model.named_parameters():
        w = effective(p)
        gathered = [torch.empty_like(w) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, w.contiguous())
        assert all(torch.equal(gathered[0], g) for g in gathered), f"{what}: replicas differ at {name}"


def _ddp_checks(rank: int, world: int) -> None:
    data = batches(STEPS)
    for mode in MODES:
        # Each rank starts from its own init and mask: wrap_ddp makes them rank 0's.
        model = tiny_model(mode, seed=rank)
        ddp = wrap_ddp(model)
        frozen = frozen_parts(model)
        _train(ddp, model, rank, data)
        _assert_matches(model, reference(mode, data), f"{mode} wrap_ddp")
        _assert_replicas_equal(model, mode)
        assert_frozen(frozen, model)

        # Plain DDP on identical replicas: its own broadcast goes through, default dense all-reduce.
        model = tiny_model(mode, seed=0)
        ddp = DistributedDataParallel(model)
        _train(ddp, model, rank, data)
        _assert_matches(model, reference(mode, data), f"{mode} plain DDP")

    # The compact hook sends only trainable slots: θ (half the slots at s = 0.5), biases whole.
    for mode in ("resu", "qresu", "sparse"):
        model = tiny_model(mode, seed=0)
        ddp = DistributedDataParallel(model)
        state = CompactAllReduceState()
        ddp.register_comm_hook(state, compact_allreduce_hook)
        x, y = data[0]
        F.mse_loss(ddp(x[rank::2]), y[rank::2]).backward()
        n_weights = sum(p.numel() for p in model.parameters() if isinstance(p, resu.ResuParameter))
        n_bias = sum(p.numel() for p in model.parameters() if not isinstance(p, resu.ResuParameter))
        assert state.last_dense == n_weights + n_bias
        assert state.last_sent == n_weights // 2 + n_bias, (mode, state.last_sent)
        if mode != "sparse":
            assert all(isinstance(p.grad, resu.CompactGrad) for p in model.parameters() if isinstance(p, resu.ResuParameter))

    # DDP options, in RESU and QRESU mode.
    for mode in ("resu", "qresu"):
        model = tiny_model(mode, seed=rank)
        ddp = wrap_ddp(model)
        _train(ddp, model, rank, data, micro=2)  # no_sync accumulation
        _assert_matches(model, reference(mode, data, micro=2), f"{mode} no_sync")

        model = tiny_model(mode, seed=rank, unused=True)
        ddp = wrap_ddp(model, find_unused_parameters=True)
        _train(ddp, model, rank, data)
        _assert_matches(model, reference(mode, data, unused=True), f"{mode} find_unused_parameters")

        model = tiny_model(mode, seed=rank)
        ddp = wrap_ddp(model, static_graph=True)
        _train(ddp, model, rank, data)
        _assert_matches(model, reference(mode, data), f"{mode} static_graph")
        _assert_replicas_equal(model, f"{mode} static_graph")

    # Compiled DDP.
    model = tiny_model("resu", seed=rank)
    ddp = wrap_ddp(model)
    # aot_eager: Dynamo (with DDP's graph splitting at bucket boundaries) and AOTAutograd over the
    # subclasses, without Inductor's code generation, which the single-process compile tests cover.
    compiled = torch.compile(ddp, backend="aot_eager")
    frozen = frozen_parts(model)
    _train(compiled, model, rank, data)
    _assert_matches(model, reference("resu", data), "compiled DDP")
    assert_frozen(frozen, model)


def test_ddp_every_mode():
    run_spawned(_ddp_checks)
