"""torch.distributed.checkpoint with ResuParameters and ResuAdamW, every mode (gloo, 2 CPU processes):
save under FSDP2 on 2 ranks, resume there bitwise (also after a rank was killed mid-step), load in 1
process (no FSDP) and save back to 2 ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import resu
from resu.distributed import get_state_dict, set_state_dict
from dist_models import MODES, Mlp, batches, effective, tiny_model
from dist_spawn import device, run_spawned
from torch.multiprocessing import ProcessExitedException
from test_distributed_fsdp import ELEMENTWISE, full_weights, sharded_model
from resu.distributed import fully_shard

LR = dict(lr=1e-2, weight_decay=0.1)


def _step(model, opt, x, y) -> None:
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _load(model, opt, path: str, **kwargs) -> None:
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path, **kwargs)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def _resume(model, path: str, x, y, rank: int, at_save, uninterrupted, what: str) -> None:
    """Load ``path`` into ``model`` and a fresh ResuAdamW, check the weights against ``at_save`` (unless
    None), take the next step on this rank's half of ``x``, and check it against ``uninterrupted``: bitwise."""
    opt = resu.ResuAdamW(model.parameters(), **LR)
    _load(model, opt, path)
    if at_save is not None:
        for name, w in full_weights(model).items():
            assert torch.equal(w, at_save[name]), f"{what}: {name} differs after loading"
    _step(model, opt, x[rank::2], y[rank::2])
    for name, w in full_weights(model).items():
        assert torch.equal(w, uninterrupted[name]), f"{what}: {name} differs after the resumed step"


KILLED_AT = 3  # the step during which rank 1 dies (after its forward)


def _train_until_killed(rank: int, world: int, root: str) -> None:
    """Every mode: 2 steps, a checkpoint, then step 3; in the last mode rank 1 dies inside step 3."""
    data = batches(4)
    for mode in MODES:
        model = sharded_model(mode)
        opt = resu.ResuAdamW(model.parameters(), **LR)
        for i, (x, y) in enumerate(data, start=1):
            if i == KILLED_AT:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(root, mode))
            loss = F.mse_loss(model(x[rank::2]), y[rank::2])
            if i == KILLED_AT and mode == MODES[-1] and rank == 1:
                os._exit(3)  # killed mid-step: rank 0 is left waiting in the backward's collectives
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i == KILLED_AT:
                break


def _dcp_checks(rank: int, world: int, root: str, killed: str) -> None:
    data = batches(3)
    for mode in MODES:
        saved_2, saved_1 = os.path.join(root, mode, "two_ranks"), os.path.join(root, mode, "one_rank")
        model = sharded_model(mode)
        opt = resu.ResuAdamW(model.parameters(), **LR)
        for x, y in data[:2]:
            _step(model, opt, x[rank::2], y[rank::2])
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=saved_2)
        at_save = full_weights(model)
        x, y = data[2]
        _step(model, opt, x[rank::2], y[rank::2])
        uninterrupted = full_weights(model)

        # Resume on 2 ranks, in a model prepared the same way from another init and mask: bitwise.
        resumed = sharded_model(mode)
        for p in resumed.parameters():  # another starting point, so the load must replace everything
            local = p._local_tensor
            if isinstance(local, resu.ResuParameter) and local.mode is not resu.ResuMode.QRESU:
                local._weight.add_(1.0)
        _resume(resumed, saved_2, x, y, rank, at_save, uninterrupted, f"{mode}, 2 -> 2")

        # Resume from the checkpoint of the run whose rank 1 was killed during step 3: bitwise.
        _resume(sharded_model(mode), os.path.join(killed, mode), x, y, rank, None, uninterrupted, f"{mode}, killed run")

        # Reshard 2 -> 1: rank 0 loads into a plain model (no FSDP), checks it, steps, saves from 1 rank.
        if rank == 0:
            single = tiny_model(mode, seed=1, select_ratio=ELEMENTWISE)
            sopt = resu.ResuAdamW(single.parameters(), **LR)
            _load(single, sopt, saved_2, no_dist=True)
            for name, p in single.named_parameters():
                assert torch.equal(effective(p), at_save[name]), f"{mode}: {name} differs on 1 rank"
            assert {type(p) for p in single.parameters()} >= {resu.ResuParameter}
            msd, osd = get_state_dict(single, sopt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=saved_1, no_dist=True)
            _step(single, sopt, x, y)  # the whole batch in one process
            for name, p in single.named_parameters():
                torch.testing.assert_close(effective(p), uninterrupted[name], rtol=1e-5, atol=1e-6)
        dist.barrier()

        # ... and 1 -> 2: both ranks load what one process saved, then step as before.
        _resume(sharded_model(mode), saved_1, x, y, rank, at_save, uninterrupted, f"{mode}, 1 -> 2")

        if mode in ("resu", "qresu"):
            _load_other_masks_into_a_model_that_ran(model, mode, os.path.join(root, mode), x, y, rank)


def _sharded_at(mode: str, sparsity: float, seed: int):
    """The test MLP pruned to ``sparsity`` from init ``seed``, in ``mode``, sharded."""
    torch.manual_seed(seed)
    model = Mlp()
    resu.sparsify_(model)
    resu.prune_(model, sparsity)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5)
    else:
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, epsilon=0.5)
    model.to(device())
    for module in (model.fc1, model.fc2, model):
        fully_shard(module)
    return model


def _load_other_masks_into_a_model_that_ran(model, mode: str, root: str, x, y, rank: int) -> None:
    """A checkpoint with other mask positions loads into a model that already ran (its gathered weights
    exist) as into a fresh one; one with other counts of pruned slots is refused at the next forward."""
    same_count, other_count = os.path.join(root, "other_positions"), os.path.join(root, "other_count")
    for path, sparsity in ((same_count, 0.5), (other_count, 0.25)):
        src = _sharded_at(mode, sparsity, seed=7)
        msd, osd = get_state_dict(src, resu.ResuAdamW(src.parameters(), **LR))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    fresh = _sharded_at(mode, 0.5, seed=0)
    for target in (model, fresh):
        opt = resu.ResuAdamW(target.parameters(), **LR)
        _load(target, opt, same_count)
        _step(target, opt, x[rank::2], y[rank::2])
    want = full_weights(fresh)
    for name, w in full_weights(model).items():
        assert torch.equal(w, want[name]), f"{mode}: {name} differs after loading other masks into a model that ran"
    _load(model, resu.ResuAdamW(model.parameters(), **LR), other_count)
    with pytest.raises(RuntimeError, match="freshly built and sharded model"):
        model(x[rank::2])


def test_dcp_save_resume_reshard(tmp_path):
    killed = str(tmp_path / "killed")
    with pytest.raises(ProcessExitedException, match="exit code 3"):
        run_spawned(_train_until_killed, killed, timeout_s=20.0)
    run_spawned(_dcp_checks, str(tmp_path), killed)
