"""Run a function on a gloo process group of spawned CPU processes (the distributed tests' harness).

Each test file groups its checks into one spawned run, since starting processes that import torch
costs seconds: the function runs on every rank, and a failed assertion on any rank fails the test
with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of one spawned run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_spawned(fn, *args, world_size: int = 2, timeout_s: float = 120.0) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined by gloo (collectives
    time out after ``timeout_s``)."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args, timeout_s), nprocs=world_size, join=True)
