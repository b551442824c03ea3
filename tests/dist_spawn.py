"""Run a function on a process group of spawned processes (the distributed tests' harness).

Each test file groups its checks into one spawned run, since starting processes that import torch
costs seconds: the function runs on every rank, and a failed assertion on any rank fails the test
with that rank's traceback.

The backend is gloo on CPU unless ``RESU_DIST_BACKEND=nccl``: then rank r runs on ``cuda:r`` and the
tests' models and batches are moved there (:func:`device`), so the same checks run over NCCL with
the CUDA kernels. Asking for NCCL without a GPU per rank fails rather than skips.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def backend() -> str:
    """The process-group backend the distributed tests use: ``RESU_DIST_BACKEND`` (default gloo)."""
    name = os.environ.get("RESU_DIST_BACKEND", "gloo")
    if name not in ("gloo", "nccl"):
        raise ValueError(f"RESU_DIST_BACKEND={name!r}: use 'gloo' (CPU) or 'nccl' (one GPU per rank)")
    return name


def device() -> torch.device:
    """Where this rank's tensors live: its own GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of one spawned run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    name = backend()
    kwargs = {}
    if name == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(name, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_spawned(fn, *args, world_size: int = 2, timeout_s: float = 120.0) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined by the backend of
    :func:`backend` (collectives time out after ``timeout_s``)."""
    if backend() == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"RESU_DIST_BACKEND=nccl needs {world_size} GPUs, this machine has {torch.cuda.device_count()}; "
                           "unset it to run the tests on gloo")
    mp.spawn(_entry, args=(world_size, free_port(), fn, args, timeout_s), nprocs=world_size, join=True)
