"""QRESU dequant+merge bandwidth on one GPU against a device-to-device copy, and a sweep of launch settings.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python benchmarks/gpu_dequant.py            # the defaults (triton_qresu.QBLOCK, NUM_WARPS)
    PYTHONPATH=. python benchmarks/gpu_dequant.py --sweep    # every (QBLOCK, NUM_WARPS) pair of the sweep
    PYTHONPATH=. python benchmarks/gpu_dequant.py --quick    # one small weight, smoke run

Weights (rows × cols): 4096×4096 and 11008×4096, sparsity 0.3 and 0.5, 4-bit codes with per-group-128
or per-channel scales, bf16 output. The kernel's bytes are what it must read and write: packed codes,
scales, zero points, θ, mask and the output; the copy is a device-to-device copy of a bf16 tensor the
size of the output (read + write), timed in the same run. Times are device times from CUDA-graph
replays (no host overhead). Before timing, each setting's output is compared bit for bit with
``dequant_merge_reference``. With ``--sweep`` the last table ranks the settings by the geometric mean of
their ratio to the copy over all cases; pick the best as the defaults (or set ``RESU_QRESU_QBLOCK`` /
``RESU_QRESU_NUM_WARPS``). Writes ``gpu_dequant.json`` to the current folder.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn as nn

import resu
from resu.compile import triton_qresu
from resu.compile.qlinear import dequant_merge_reference

from gpu_linear import _graph_time_ms  # this folder is on sys.path when the script runs

SWEEP = [(512, 2), (1024, 2), (1024, 4), (2048, 2), (2048, 4), (2048, 8), (4096, 4), (4096, 8)]


def qresu_args(rows: int, cols: int, sparsity: float, scheme: str) -> tuple:
    """``resu::dequant_merge``'s arguments (before ``out_dtype``) of one 4-bit QRESU weight on the GPU."""
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows, bias=False, device="cuda")
    resu.sparsify_(layer)
    resu.prune_(layer, sparsity)
    resu.enter_qresu_(layer, bits=4, scheme=scheme, group_size=128 if scheme == "per_group" else None, epsilon=0.1)
    return layer.weight._quant_op_args()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help=f"time every (QBLOCK, NUM_WARPS) of {SWEEP}")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--schemes", nargs="+", default=["per_group", "per_channel"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    shapes = [(4096, 4096), (11008, 4096)]
    if args.quick:
        shapes, args.iters = [(512, 1024)], 5
    settings = SWEEP if args.sweep else [(triton_qresu.QBLOCK, triton_qresu.NUM_WARPS)]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton_qresu.triton.__version__}  "
          f"defaults QBLOCK={triton_qresu.QBLOCK} NUM_WARPS={triton_qresu.NUM_WARPS}")
    print(f"{'weight':>11} {'s':>4} {'scheme':>11} {'QBLOCK':>6} {'warps':>5} {'µs':>8} {'GB/s':>7} {'copy GB/s':>9} "
          f"{'ratio':>6}")
    rows_out = []
    for rows, cols in shapes:
        for s in args.sparsities:
            for scheme in args.schemes:
                torch.cuda.empty_cache()
                qargs = qresu_args(rows, cols, s, scheme)
                ref = dequant_merge_reference(*qargs, torch.bfloat16)
                moved = sum(t.numel() * t.element_size() for t in qargs[:5]) + ref.numel() * ref.element_size()
                src, dst = torch.empty_like(ref), torch.empty_like(ref)
                copy_ms = _graph_time_ms(lambda: dst.copy_(src), args.iters)
                copy_gbs = 2 * ref.numel() * ref.element_size() / copy_ms / 1e6
                for block, warps in settings:
                    def run():
                        return triton_qresu.dequant_merge_triton(*qargs, torch.bfloat16, block=block, num_warps=warps)

                    if not torch.equal(run().view(torch.int16), ref.view(torch.int16)):
                        raise SystemExit(f"QBLOCK={block} NUM_WARPS={warps}: output differs from the reference "
                                         f"({rows}×{cols}, s={s}, {scheme})")
                    ms = _graph_time_ms(run, args.iters)
                    gbs = moved / ms / 1e6
                    rows_out.append(dict(rows=rows, cols=cols, sparsity=s, scheme=scheme, block=block, warps=warps,
                                         us=ms * 1e3, gbs=gbs, copy_gbs=copy_gbs, ratio=gbs / copy_gbs))
                    print(f"{f'{rows}×{cols}':>11} {s:4.1f} {scheme:>11} {block:6d} {warps:5d} {ms * 1e3:8.1f} "
                          f"{gbs:7.0f} {copy_gbs:9.0f} {gbs / copy_gbs:6.3f}", flush=True)
                del qargs, ref, src, dst
    if len(settings) > 1:
        print(f"{'QBLOCK':>6} {'warps':>5} {'geomean ratio':>13} {'worst':>6}")
        ranked = []
        for block, warps in settings:
            ratios = [r["ratio"] for r in rows_out if (r["block"], r["warps"]) == (block, warps)]
            ranked.append((math.exp(sum(map(math.log, ratios)) / len(ratios)), min(ratios), block, warps))
        for geo, worst, block, warps in sorted(ranked, reverse=True):
            print(f"{block:6d} {warps:5d} {geo:13.3f} {worst:6.3f}")
    print("target (DESIGN.md §7): dequant+merge ≥ 0.80× the copy's bandwidth")
    with open("gpu_dequant.json", "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows_out}, fh, indent=1)


if __name__ == "__main__":
    main()
