"""Host (Python) time of one ``resu::dequant_merge`` call on the CUDA path: checks, caches, launch.

    PYTHONPATH=. python benchmarks/host_dequant.py [--shape 2048 2048 --group 128 --calls 200 --repeats 50]
    PYTHONPATH=. python benchmarks/host_dequant.py --device cuda      # on a GPU: real launches as well

The QRESU forward and input gradient rebuild every weight with ``resu::dequant_merge``; in a training
step of a 1B decoder that is hundreds of calls, so the Python work around the kernel decides whether
the step is host-bound. On the CPU the CUDA launcher (``triton_qresu.dequant_merge_triton``) runs on
CPU tensors with the Triton kernel replaced by a no-op, so what is timed is the Python around it:

- ``check``: the launch check alone (``check_launch_dequant_merge``);
- ``offsets``: the per-mask block offsets lookup (bitmap masks only);
- ``launcher, stub``: the whole launcher body, launch stubbed;
- ``op, stub``: the same body reached through the dispatcher, as ``torch.ops.resu.dequant_merge`` reaches
  it on CUDA (``Library.impl`` of the same schema in a benchmark-only library, on this device's key);
- ``op, empty kernel``: the dispatcher alone (a kernel that returns a preallocated tensor).

With ``--device cuda`` two more rows time the real thing: the launcher and ``torch.ops.resu.dequant_merge``
with Triton's launch (host time only: the GPU runs behind, it is not waited for inside the timing).
What the CPU run cannot see is the Triton launch's own host cost (argument binding, specialization,
the driver call): that needs the GPU rows.

Times are µs per call: the median over ``--repeats`` of the mean of ``--calls`` back-to-back calls.
Cases: 4-bit per-group codes, s = 0.5 (bitmap mask) and s = 0.02 (a pruned-index list).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import resu
from resu.compile import triton_qresu
from resu.compile.launch_checks import check_launch_dequant_merge
from resu.compile.triton_bitmap import cached_block_offsets

SCHEMA = (
    "dequant_merge(Tensor qdata, Tensor scale, Tensor zero, Tensor theta, Tensor storage, str encoding, "
    "int n_pruned, int rows, int cols, int bits, int group_cols, int row_stride, str decode, ScalarType out_dtype) "
    "-> Tensor"
)


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing and counts the launch."""

    launches = 0

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        _NoLaunch.launches += 1


def build_args(shape, sparsity: float, group: int, device: str) -> tuple:
    """``resu::dequant_merge``'s arguments (before ``out_dtype``) for one 4-bit per-group QRESU weight."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False)
    resu.sparsify_(layer)
    resu.prune_(layer, sparsity)
    resu.enter_qresu_(layer, bits=4, scheme="per_group", group_size=group, epsilon=0.1)
    args = layer.weight._quant_op_args()
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def time_us(fn, calls: int, repeats: int, sync=None) -> float:
    """Median over ``repeats`` of the mean host time of ``calls`` back-to-back calls, in µs."""
    for _ in range(max(3, calls // 10)):
        fn()
    means = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - t0) / calls * 1e6)
    if sync:
        sync()
    return statistics.median(means)


def bench_library(device: str, kernel_for):
    """A benchmark-only op library with dequant_merge's schema, registered on ``device``'s dispatch key
    the way ``resu.compile.registry`` registers resu's CUDA kernels; returns ``make(kernel) -> op``."""
    lib = torch.library.Library("resu_host_bench", "FRAGMENT")
    key = "CUDA" if device == "cuda" else "CPU"
    ops = {}
    for name, kernel in kernel_for.items():
        lib.define(SCHEMA.replace("dequant_merge(", f"{name}(", 1))
        lib.impl(name, kernel, key)
        ops[name] = getattr(torch.ops.resu_host_bench, name).default
    return lib, ops


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[2048, 2048], help="weight rows, cols")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    dtype = torch.bfloat16
    cases = {"bitmap s=0.5": build_args(args.shape, 0.5, args.group, args.device),
             "indices s=0.02": build_args(args.shape, 0.02, args.group, args.device)}
    real_kernel = triton_qresu._dequant_merge_kernel
    preallocated = {}

    def empty_kernel(*a):
        return preallocated["out"]

    lib, ops = bench_library(args.device, {"stubbed": triton_qresu.dequant_merge_triton, "empty": empty_kernel})
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    rows = []
    for case, qargs in cases.items():
        numel = qargs[7] * qargs[8]
        preallocated["out"] = torch.empty(qargs[7], qargs[8], dtype=dtype, device=args.device)
        timed = {"check": lambda: check_launch_dequant_merge(*qargs)}
        if qargs[5] == "bitmap":
            timed["offsets"] = lambda: cached_block_offsets(qargs[4], numel, True, triton_qresu.QBLOCK)
        timed["launcher, stub"] = lambda: triton_qresu.dequant_merge_triton(*qargs, dtype)
        timed["op, stub"] = lambda: ops["stubbed"](*qargs, dtype)
        timed["op, empty kernel"] = lambda: ops["empty"](*qargs, dtype)
        triton_qresu._dequant_merge_kernel = _NoLaunch()
        try:
            for what, fn in timed.items():
                rows.append((case, what, time_us(fn, args.calls, args.repeats)))
        finally:
            triton_qresu._dequant_merge_kernel = real_kernel
        if args.device == "cuda":
            for what, fn in (("launcher, real launch", lambda: triton_qresu.dequant_merge_triton(*qargs, dtype)),
                             ("torch.ops.resu, real", lambda: torch.ops.resu.dequant_merge(*qargs, dtype))):
                rows.append((case, what, time_us(fn, args.calls, args.repeats, sync)))
    del lib
    print(f"resu::dequant_merge host time, {args.shape[0]}×{args.shape[1]} 4-bit per-group {args.group}, bf16 out, "
          f"device {args.device}, torch {torch.__version__}")
    print(f"| {'case':<15} | {'what':<22} | {'µs/call':>8} |")
    print(f"|{'-' * 17}|{'-' * 24}|{'-' * 10}|")
    for case, what, us in rows:
        print(f"| {case:<15} | {what:<22} | {us:8.2f} |")


if __name__ == "__main__":
    main()
