"""FSDP2 (``fully_shard``, gloo, 2 CPU processes) with ResuParameters in every mode.

One spawned run does every check: starting processes dominates the cost.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import DTensor

import resu
from resu.distributed import fully_shard
from resu.distributed.reduce_scatter import fsdp_param_group
from resu.distributed.select import kth_largest_across
from dist_models import MODES, Mlp, assert_close_to, batches, effective, reference, tiny_model
from dist_spawn import device, run_spawned

STEPS = 3


# Screen and select ratios 1: RESU-Selective's elementwise criterion only (the DCP tests use it).
ELEMENTWISE = 1.0


def sharded_model(mode: str, select_ratio: float = ELEMENTWISE, **kwargs):
    model = tiny_model(mode, seed=0, select_ratio=select_ratio)
    fully_shard(model.fc1, **kwargs)
    fully_shard(model.fc2, **kwargs)
    fully_shard(model, **kwargs)
    return model


def train(model, rank: int, data: list, compiled=None) -> resu.ResuAdamW:
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    run = compiled or model
    for x, y in data:
        # The loss in fp32 (a bf16 model's output upcast): CUDA's mse_loss backward refuses mixed dtypes.
        F.mse_loss(run(x[rank::2]).float(), y[rank::2]).backward()
        opt.step()
        opt.zero_grad()
    return opt


def train_whole_batches(model, data: list):
    """``model`` trained in this process alone on the whole batches (what the ranks' halves add up to)."""
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def full_weights(model) -> dict:
    """Every parameter's full effective weight, assembled from the ranks' local shards."""
    out = {}
    for name, p in model.named_parameters():
        local = effective(p._local_tensor if isinstance(p, DTensor) else p).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        out[name] = torch.cat(parts)
    return out


def local_frozen(model) -> dict:
    """Each local shard's frozen parts (active values; or codes, scales and mask)."""
    out = {}
    for name, p in model.named_parameters():
        local = p._local_tensor
        if isinstance(local, resu.ResuParameter) and local.mode is resu.ResuMode.RESU:
            out[name] = [local.effective_weight()[local.active_mask].clone()]
        elif isinstance(local, resu.ResuParameter) and local.mode is resu.ResuMode.QRESU:
            out[name] = [t.clone() for t in (local._qdata, local._qscale, local._qzero, local._mask_storage)]
    return out


def _full_weights_outlive_sharding(mode: str) -> list[str]:
    """Names of the unsharded ResuParameters still alive after fully_shard (each would hold the whole
    weight on every rank for the rest of the run)."""
    import gc
    import weakref

    model = tiny_model(mode, seed=0, select_ratio=ELEMENTWISE)
    originals = [(n, weakref.ref(p)) for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)]
    assert originals
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    gc.collect()
    return [n for n, ref in originals if ref() is not None]


def _full_masks(model) -> list:
    """The mask tensors of the gathered (unsharded) ResuParameters."""
    out = []
    for module in (model.fc1, model.fc2):
        for fsdp_param in fsdp_param_group(module).fsdp_params:
            full = getattr(fsdp_param, "_unsharded_param", None)
            if isinstance(full, resu.ResuParameter) and full.mode.has_mask:
                out.append(full._mask_storage)
    return out


def _fsdp_checks(rank: int, world: int) -> None:
    data = batches(STEPS)
    for mode in MODES:
        assert _full_weights_outlive_sharding(mode) == [], mode
        model = sharded_model(mode)
        local = model.fc1.weight._local_tensor
        assert isinstance(model.fc1.weight, DTensor) and isinstance(local, resu.ResuParameter)
        assert local.shape == (8, 8) and local.mode is tiny_model(mode).fc1.weight.mode
        frozen = local_frozen(model)
        opt = train(model, rank, data)
        assert_close_to(full_weights(model), reference(mode, data, select_ratio=ELEMENTWISE), f"FSDP2 {mode}")
        # The reduce-scatter sent the trainable slots (half the weight's at s = 0.5) and the bias whole.
        comm = fsdp_param_group(model.fc1)._reduce_scatter_comm
        assert comm.last_dense == 16 * 8 + 16 and comm.last_sent == 16 * 8 // 2 + 16, (mode, comm.last_sent)
        for name, parts in frozen.items():
            now = local_frozen(model)[name]
            assert all(torch.equal(a, b) for a, b in zip(parts, now)), f"{mode}: frozen part of {name} moved"
        # The full mask joined at the first all-gather is kept (not rebuilt per all-gather), so the
        # kernels' per-mask caches stay valid from step to step.
        masks = _full_masks(model)
        assert len(masks) == 2, mode
        train(model, rank, data[:1])
        assert all(a is b for a, b in zip(masks, _full_masks(model))), f"{mode}: the full mask was rebuilt"
        # ResuAdamW's states are this rank's compact slots only (never the full weight's).
        for p in (model.fc1.weight, model.fc2.weight):
            shard = p._local_tensor
            n_slots = shard.n_pruned if mode != "sparse" else shard.numel() - shard.n_pruned
            assert opt.state[p]["exp_avg"].shape == (n_slots,), mode
            assert isinstance(opt.state[p]["exp_avg"], torch.Tensor) and not isinstance(opt.state[p]["exp_avg"], DTensor)

    # RESU-Selective with top-k screens and selects (ratios 0.5): the thresholds rank every rank's θ
    # slots together, so the shards select what one process selects.
    model = sharded_model("selective", select_ratio=0.5)
    train(model, rank, data)
    assert_close_to(full_weights(model), reference("selective", data, select_ratio=0.5), "FSDP2 selective, top-k")
    _check_kth_largest_across(rank, world)
    _check_shard_selection_with_ties(rank, world)
    # A rank whose shard of fc1 has no θ slots still takes part in the other rank's selects.
    model = _selective_with_an_empty_shard()
    for module in (model.fc1, model.fc2, model):
        fully_shard(module)
    assert model.fc1.weight._local_tensor.n_pruned == (0 if rank == 1 else 64)
    train(model, rank, data)
    one_process = train_whole_batches(_selective_with_an_empty_shard(), data)
    assert_close_to(full_weights(model), one_process, "FSDP2 selective, a shard without θ")

    # Torch's own fully_shard on ResuParameters would drop masks and modes: refused, naming the fix.
    try:
        torch_fully_shard(tiny_model("resu").fc1)
    except RuntimeError as exc:
        assert "resu.distributed.fully_shard" in str(exc)
    else:
        raise AssertionError("torch's fully_shard on a RESU weight was not refused")

    # A model without ResuParameters, sharded by torch's own fully_shard: ResuAdamW trains it as AdamW.
    torch.manual_seed(0)
    plain, plain_ref = Mlp().to(device()), Mlp().to(device())
    plain_ref.load_state_dict(plain.state_dict())
    torch_fully_shard(plain)
    train(plain, rank, data)
    assert_close_to(full_weights(plain), train_whole_batches(plain_ref, data), "torch fully_shard, plain model")

    # QRESU: the all-gather moves packed codes, scales, θ and mask bits, no dense weight.
    model = sharded_model("qresu")
    shard = model.fc1.weight._local_tensor
    inputs, _ = shard.fsdp_pre_all_gather(None, None, None, None, MixedPrecisionPolicy())
    assert inputs[0].dtype == torch.uint8 and inputs[0].numel() == shard.numel() // 2
    assert not any(t.is_floating_point() and t.numel() >= shard.numel() for t in inputs)
    train(model, rank, data[:1])
    for module in (model.fc1, model.fc2):
        for fsdp_param in fsdp_param_group(module).fsdp_params:
            # FSDP2's persistent flat data of a QRESU shard is its θ, not a dense copy.
            local = fsdp_param.sharded_param._local_tensor
            if isinstance(local, resu.ResuParameter):
                assert fsdp_param._sharded_param_data.numel() == local.n_pruned

    # torch.compile per block (each sharded Linear compiled in place; FSDP2's hooks run outside).
    # QRESU only, the mode with the most inner tensors (compiling costs seconds on a CPU).
    for mode in ("qresu",):
        model = sharded_model(mode)
        # aot_eager: Dynamo and AOTAutograd over the gathered ResuParameter, without Inductor's code
        # generation (covered by the single-process compile tests; it costs seconds per graph on a CPU).
        model.fc1.compile(fullgraph=True, backend="aot_eager")
        model.fc2.compile(fullgraph=True, backend="aot_eager")
        frozen = local_frozen(model)
        train(model, rank, data)
        assert_close_to(full_weights(model), reference(mode, data), f"FSDP2 compiled {mode}")
        assert all(torch.equal(a, b) for n, parts in frozen.items() for a, b in zip(parts, local_frozen(model)[n]))

    # Mixed precision: bf16 compute, fp32 reduce; frozen parts stay bitwise frozen.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for mode in ("resu", "qresu"):
        model = sharded_model(mode, mp_policy=policy)
        frozen = local_frozen(model)
        train(model, rank, data)
        assert_close_to(full_weights(model), reference(mode, data), f"FSDP2 bf16 {mode}", rtol=0.05, atol=0.02)
        assert all(torch.equal(a, b) for n, parts in frozen.items() for a, b in zip(parts, local_frozen(model)[n]))


def _check_kth_largest_across(rank: int, world: int) -> None:
    """The k-th largest key over all ranks equals the k-th largest of the ranks' keys joined (−1 masked)."""
    g = torch.Generator().manual_seed(5)
    for n_per_rank in (1, 7, 300):
        joined = torch.randperm(world * n_per_rank * 4, generator=g)[: world * n_per_rank].to(torch.int64)
        joined = joined * (1 << 33) + torch.randint(0, 1 << 32, joined.shape, generator=g)  # distinct, 64-bit wide
        joined[torch.rand(joined.shape, generator=g) < 0.3] = -1
        mine = joined.view(world, -1)[rank].to(device())
        valid = joined[joined >= 0].sort(descending=True).values
        for k in (1, 2, max(1, valid.numel() // 2), valid.numel(), valid.numel() + 1):
            got = kth_largest_across(mine, k)
            want = valid[k - 1] if k <= valid.numel() else torch.tensor(-1)
            assert int(got) == int(want), (n_per_rank, k, int(got), int(want))


def _selective_with_an_empty_shard():
    """The test MLP, pruned globally after fc1's rows 8-15 were made large: all of fc1's θ is in rows
    0-7 (rank 0's shard), none in rank 1's; RESU-Selective with top-k ratios 0.5."""
    torch.manual_seed(0)
    model = Mlp()
    with torch.no_grad():
        model.fc1.weight[8:] += 10.0
    resu.sparsify_(model)
    resu.prune_(model, 0.5, scope="global")
    config = resu.SelectionConfig(k_screen_ratio=0.5, k_select_ratio=0.5, tau_stable=0.3)
    resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0), selective=config)
    return model.to(device())


def _check_shard_selection_with_ties(rank: int, world: int) -> None:
    """Each rank's part of a selection over tied gradients, uneven shards (one of them empty) equals
    that part of the one-process selection: ties break by the slot's index in the whole weight."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from resu.distributed.select import ShardSelection
    from resu.optim.consistency import consistency_selection
    from resu.optim.selection_config import SelectionConfig

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    config = SelectionConfig(k_screen_ratio=0.5, k_select_ratio=0.4, tau_stable=0.3)
    g = torch.Generator().manual_seed(11)
    for counts in ((10, 14), (24, 0), (0, 9)):
        n = sum(counts)
        # Every slot tied first (the selection is then by index alone), then many exact ties.
        steps = [torch.full((n,), 0.5)] + [torch.randint(-3, 4, (n,), generator=g).float() / 4 for _ in range(3)]
        whole = [torch.zeros(n), torch.zeros(n)]
        start = sum(counts[:rank])
        mine = [torch.zeros(counts[rank], device=device()) for _ in range(2)]
        shard = ShardSelection(group=None, offset=start, n_total=n)
        for grad in steps:
            keys, thr, _, _ = consistency_selection(grad, *whole, config, False)
            want = (keys >= thr)[start:start + counts[rank]]
            with HostReads():
                my_keys, my_thr, _, n_sel = consistency_selection(grad[start:start + counts[rank]].to(device()), *mine,
                                                                  config, False, shard=shard)
            assert torch.equal((my_keys >= my_thr).cpu(), want), (counts, rank)
            assert int(n_sel) == int(want.sum())
            if mine[0].is_cuda:  # the kernel may contract multiply-adds into FMAs: an ulp from the CPU
                torch.testing.assert_close(mine[0].cpu(), whole[0][start:start + counts[rank]], rtol=1e-6, atol=0)
            else:
                assert torch.equal(mine[0], whole[0][start:start + counts[rank]])
        assert HostReads.count == 0, f"{HostReads.count} host reads of device data in the sharded selection"


def test_fsdp2_every_mode():
    run_spawned(_fsdp_checks)
