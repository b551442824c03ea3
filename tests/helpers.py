"""Small builders shared by the tests."""

from __future__ import annotations

import torch
import torch.nn as nn

import resu


def mlp(d_in=12, d_hidden=20, d_out=5, seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out)).to(dtype)


def model_in_mode(mode: str, sparsity=0.5, seed=0, dtype=torch.float32, **kw) -> nn.Module:
    """An MLP whose Linear weights are ResuParameters in ``mode`` ("dense", "sparse", "resu", "qresu")."""
    model = resu.sparsify_(mlp(seed=seed, dtype=dtype, **kw))
    if mode in ("sparse", "resu", "qresu"):
        resu.prune_(model, sparsity)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(seed))
    if mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, epsilon=0.5,
                          generator=torch.Generator().manual_seed(seed))
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything about a model's parameters that must survive an operation unchanged."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            out[name] = (type(p), p.mode, p.effective_weight().clone(), p.active_mask.clone())
        else:
            out[name] = (type(p), None, p.detach().clone(), None)
    return out


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        ta, ma, wa, mka = a[k]
        tb, mb, wb, mkb = b[k]
        assert ta is tb and ma == mb, k
        assert torch.equal(wa, wb), k
        assert (mka is None and mkb is None) or torch.equal(mka, mkb), k


def train_classifier(model: nn.Module, opt, steps: int = 3, seed: int = 1) -> None:
    """``steps`` optimizer steps of cross-entropy on fresh random (16 × 12 → 5 classes) batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _bytes(t):
    return None if t is None else t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def exact_state(model: nn.Module) -> list:
    """Every parameter's object, type, mode, mask bytes, weight and θ bits and gradient bits: what an
    all-or-nothing operation must leave exactly as it was when it fails."""
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        entry = [name, id(p), type(p), p.requires_grad, _bytes(p.grad)]
        if isinstance(p, resu.ResuParameter):
            mask = p.mask
            entry += [
                p.mode,
                p.n_pruned,
                p.quant_format,
                None if mask is None else (mask.encoding, _bytes(mask.storage)),
                _bytes(p.effective_weight()),
                _bytes(p.theta),
            ]
        else:
            entry.append(_bytes(p))
        out.append(entry)
    return out


def assert_same_state(before: list, after: list, same_objects: bool = True) -> None:
    """``exact_state``s equal; ``same_objects=False`` compares a twin model (other parameter objects)."""
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert len(a) == len(b), b[0]
        if not same_objects:
            b, a = b[:1] + b[2:], a[:1] + a[2:]
        for x, y in zip(b, a):
            if isinstance(x, tuple):  # (encoding, storage bytes)
                assert x[0] == y[0] and torch.equal(x[1], y[1]), b[0]
            elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y), b[0]
            else:
                assert x == y, b[0]


def fail_on_call(monkeypatch, owner, attribute: str, call: int = 2):
    """Make ``owner.attribute`` raise on its ``call``-th call (the earlier calls run normally); returns
    the list of call counts, so a test can check the failure was reached."""
    real = getattr(owner, attribute)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(f"injected failure in {attribute}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, wrapper)
    return calls


def import_benchmarks(*names: str) -> tuple:
    """The scripts ``benchmarks/<name>.py`` as modules (the folder is on ``sys.path`` only while importing)."""
    import importlib
    import os
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, folder)
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(folder)
