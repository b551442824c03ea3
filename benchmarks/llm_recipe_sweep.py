"""Which recovery recipe works after pruning a pretrained LM: a sweep at equal steps and tokens.

Trains a byte-level Llama-style LM from scratch on the Python standard library's sources (see
``lm_scratch.py``), prunes it with Wanda, then gives every recipe the same number of optimizer steps on
the same batches and reports validation bits per byte::

    PYTHONPATH=. python benchmarks/llm_recipe_sweep.py --device cuda            # GPU, a few minutes
    PYTHONPATH=. python benchmarks/llm_recipe_sweep.py --size tiny --scratch-steps 30 --steps 6 --seeds 0

Recipes (``N`` = ``--steps``):
- ``oneshot``: Wanda alone.
- ``finetune``: SPARSE fine-tuning of the active weights for N steps.
- ``resu_drop``: RESU for N/2, θ dropped (``exit_resu_(commit=False)``), fine-tune N/2 (control: the
  RESU phase then changes nothing).
- ``amnesty``: RESU N/2 → ``commit_(amnesty, wanda)`` with a forced resurrection quota r → fine-tune N/2.
- ``reprune``: RESU N/2 → one joint Wanda ranking of merged weights (no quota) → fine-tune N/2.
- ``capped``: RESU N/2 → joint ranking, but at most r·n_keep resurrections per row → fine-tune N/2.
- ``ft_resu_ft``: fine-tune N/3 → RESU N/3 → capped commit → fine-tune N/3.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import lm_scratch  # noqa: E402

import resu  # noqa: E402
from resu.prune.amnesty import amnesty_keep, joint_keep  # noqa: E402


def stdlib_split(split: str) -> list[str]:
    """Source texts of the standard library's modules in one of three disjoint splits (by file hash)."""
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if "site-packages" in rel or "dist-packages" in rel or "test" in rel.split(os.sep)[0]:
            continue
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20
        which = "val" if bucket == 0 else "test" if bucket == 1 else "train"
        if which == split:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    return texts


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, device: str, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch].to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, labels=x).loss.float()
        n = x.numel() - x.shape[0]
        total += loss.item() * n
        count += n
    return total / count / math.log(2)


def fixed_windows(tokens: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    stride = max(seq_len, (tokens.numel() - seq_len) // n)
    return torch.stack([tokens[i * stride : i * stride + seq_len] for i in range(n)])


def train_steps(model, batches, steps: int, lr: float, device: str) -> None:
    """``steps`` optimizer steps of ResuAdamW on the model's ResuParameters only (the rest stays frozen)."""
    if steps <= 0:
        return
    params = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    opt = resu.ResuAdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x = next(batches).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def capped_commit_(model, norms_batches, budget: float, cap: bool) -> int:
    """Merge θ, then rank merged weights jointly by Wanda; with ``cap``, at most ``budget·n_keep`` of each
    row's kept slots may be resurrected ones. Returns the number of resurrected slots."""
    weights = [p for p in model.parameters() if isinstance(p, resu.ResuParameter) and p.mode is resu.ResuMode.RESU]
    was_pruned = {id(p): (~p.active_mask).clone() for p in weights}
    from resu.prune.calibration import activation_norms

    norms = activation_norms(model, {id(p): p for p in weights}, norms_batches, None)
    resu.exit_resu_(model, commit=True)
    resurrected = 0
    for p in weights:
        old = was_pruned[id(p)]
        scores = p.effective_weight().abs().float() * norms[id(p)].float()
        n_keep = (~old).sum(dim=1)
        keep = joint_keep(scores, n_keep)
        if cap:
            too_many = (keep & old).sum(dim=1) > torch.floor(n_keep.double() * budget).long()
            keep = torch.where(too_many[:, None], amnesty_keep(scores, old, n_keep, budget), keep)
        p._apply_pruning_(~keep)
        resurrected += int((keep & old).sum())
    return resurrected


def run_recipe(name, pruned, batches_for, args, lr_ft, lr_theta, calib, device) -> tuple[float, dict]:
    model = copy.deepcopy(pruned)
    n = args.steps
    batches = batches_for()
    info = {}
    if name == "finetune":
        train_steps(model, batches, n, lr_ft, device)
    elif name in ("resu_drop", "amnesty", "reprune", "capped"):
        resu.enter_resu_(model, epsilon=args.epsilon, generator=torch.Generator().manual_seed(0))
        train_steps(model, batches, n // 2, lr_theta, device)
        if name == "resu_drop":
            resu.exit_resu_(model, commit=False)
        elif name == "amnesty":
            stats = resu.commit_(model, "amnesty", score_type="wanda", calib=calib, r_start=args.budget)
            info["resurrected"] = stats.n_resurrected
        else:
            info["resurrected"] = capped_commit_(model, calib, args.budget, cap=name == "capped")
        info["after_commit"] = bits_per_byte(model, args.val, device)
        train_steps(model, batches, n - n // 2, lr_ft, device)
    elif name == "ft_resu_ft":
        third = n // 3
        train_steps(model, batches, third, lr_ft, device)
        resu.enter_resu_(model, epsilon=args.epsilon, generator=torch.Generator().manual_seed(0))
        train_steps(model, batches, third, lr_theta, device)
        info["resurrected"] = capped_commit_(model, calib, args.budget, cap=True)
        train_steps(model, batches, n - 2 * third, lr_ft, device)
    return bits_per_byte(model, args.val, device), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="small", choices=sorted(lm_scratch.SIZES))
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scratch-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["oneshot", "finetune", "resu_drop", "amnesty", "reprune", "capped", "ft_resu_ft"])
    ap.add_argument("--lrs-ft", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--lrs-theta", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    device = args.device
    t0 = time.time()
    train_tokens = lm_scratch.byte_tokens(stdlib_split("train"))
    args.val = fixed_windows(lm_scratch.byte_tokens(stdlib_split("val")), 64, args.seq)
    print(f"train bytes {train_tokens.numel() / 1e6:.1f}M  device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    torch.manual_seed(0)
    dense = lm_scratch.build_model(args.size, args.seq)
    print(f"model {args.size}: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters")
    lm_scratch.train_from_scratch(dense, train_tokens, steps=args.scratch_steps, batch=args.batch, seq_len=args.seq, device=device)
    results = {"dense": bits_per_byte(dense, args.val, device), "runs": []}
    print(f"dense val bpb {results['dense']:.4f}  ({time.time() - t0:.0f}s)")
    calib_gen = torch.Generator().manual_seed(1234)
    calib = [b.to(device) for b, _ in zip(lm_scratch.random_windows(train_tokens, 8, args.seq, calib_gen), range(4))]

    def batches_for_seed(seed):
        def make():
            g = torch.Generator().manual_seed(10_000 + seed)
            return lm_scratch.random_windows(train_tokens, args.batch, args.seq, g)
        return make

    for sparsity in args.sparsities:
        pruned = copy.deepcopy(dense)
        resu.sparsify_(pruned, filter_fn=lambda name, m: "lm_head" not in name)
        resu.prune_(pruned, sparsity, method="wanda", calib=calib)
        oneshot = bits_per_byte(pruned, args.val, device)
        print(f"s={sparsity}: wanda one-shot {oneshot:.4f}")
        # learning rates: chosen on seed 0 for the two training kinds separately
        best_ft = min(args.lrs_ft, key=lambda lr: run_recipe("finetune", pruned, batches_for_seed(99), args, lr, 0, calib, device)[0])
        best_theta = min(
            args.lrs_theta,
            key=lambda lr: run_recipe("capped", pruned, batches_for_seed(99), args, best_ft, lr, calib, device)[0],
        )
        print(f"  lr fine-tune {best_ft:g}, lr θ {best_theta:g}  ({time.time() - t0:.0f}s)")
        for name in args.recipes:
            vals = []
            for seed in args.seeds:
                if name == "oneshot":
                    bpb, info = oneshot, {}
                else:
                    bpb, info = run_recipe(name, pruned, batches_for_seed(seed), args, best_ft, best_theta, calib, device)
                vals.append(bpb)
                results["runs"].append(dict(sparsity=sparsity, recipe=name, seed=seed, bpb=bpb, lr_ft=best_ft, lr_theta=best_theta, **info))
            mean = sum(vals) / len(vals)
            std = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
            print(f"  {name:12s} {mean:.4f} ± {std:.4f}   {' '.join(f'{v:.4f}' for v in vals)}  ({time.time() - t0:.0f}s)")
    with open(os.path.join(args.out, "llm_recipe_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
