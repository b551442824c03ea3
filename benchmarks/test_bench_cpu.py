"""CPU micro-benchmarks (pytest-benchmark): a RESU training step, eager vs compiled, vs dense.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_cpu.py --benchmark-enable -q

Not part of the test suite (``testpaths`` is ``tests``); timings belong here, not in assertions.
"""

import pytest
import torch
import torch.nn as nn

import resu


def _setup(kind: str, compiled: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    if kind == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        resu.sparsify_(model)
        resu.prune_(model, 0.5)
        resu.enter_resu_(model, epsilon=0.1)
        opt = resu.ResuAdamW(model.parameters(), lr=1e-3)
    run = torch.compile(model, fullgraph=True) if compiled else model
    x = torch.randn(64, 256)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    return step


@pytest.mark.parametrize("kind", ["dense", "resu"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_step(benchmark, kind, compiled):
    torch._dynamo.reset()
    benchmark(_setup(kind, compiled))
