"""Device time of the optimizer kernels alone (torch.profiler), one 11008×4096 weight at s = 0.5.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/gpu_optim_kernels.py

``benchmarks/gpu_optim.py`` times back-to-back ``opt.step()`` calls, which include the host's Python
work whenever it is longer than the device's; this script reports what the GPU spends in each
kernel of one step (self device time over 20 profiled steps, per call), for fused dense AdamW
(``dense``), ResuAdamW on a RESU weight one weight at a time (``resu-1by1``: the bitmap kernel) and
grouped (``resu``: the multi-tensor kernel, at several ``BLOCKS_PER_PROGRAM``), and on a QRESU weight
(``qresu``: the grouped kernel's compact θ path). The five largest device items of each step are
printed with their per-call time and count per step.
"""

from __future__ import annotations

import os
import sys

import torch

import resu.compile.triton_adamw as triton_adamw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_optim  # noqa: E402  (the optimizer rows' builders)

# (row kind of gpu_optim.build, blocks per program of the grouped kernel)
PLAN = (("dense", 8), ("resu-1by1", 8), ("resu", 1), ("resu", 4), ("resu", 8), ("resu", 16), ("qresu", 8))


def main() -> None:
    default = triton_adamw.BLOCKS_PER_PROGRAM
    print(f"optimizer kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, 11008×4096, s = 0.5")
    for kind, blocks in PLAN:
        triton_adamw.BLOCKS_PER_PROGRAM = blocks
        torch.cuda.empty_cache()
        layers, opt = gpu_optim.build(kind, (11008, 4096), 1, 0.5, "cuda")
        weight = layers[0].weight
        grads = gpu_optim._grads([weight])
        for i in range(5):
            weight.grad = grads[i % 3][0]
            opt.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(20):
                weight.grad = grads[i % 3][0]
                opt.step()
            torch.cuda.synchronize()
        rows = [(e.key, e.self_device_time_total / e.count, e.count) for e in prof.key_averages()
                if e.self_device_time_total > 0]
        rows.sort(key=lambda r: -r[1] * r[2])
        print(kind, blocks, "; ".join(f"{k[:40]} {t:.1f} us x{c // 20}" for k, t, c in rows[:5]), flush=True)
        del layers, opt, grads
    triton_adamw.BLOCKS_PER_PROGRAM = default


if __name__ == "__main__":
    main()
