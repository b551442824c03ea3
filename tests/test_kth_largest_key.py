"""The radix threshold select of RESU-Selective gives exactly the top-k threshold, on fresh random keys."""

import pytest
import torch

from resu.compile import registry
from resu.optim import consistency as C
from resu.optim.selection_config import SelectionConfig


def _grad(kind, n, gen):
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "ties":  # few distinct |g|: the select must break ties by position
        return torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(n)
    scale = torch.tensor([0.0, 1e30, 1e-30, float("inf")])  # zeros, huge, subnormal-ish, inf together
    return torch.randn(n, generator=gen) * scale[torch.randint(0, 4, (n,), generator=gen)]


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "extremes"])
@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_key_equals_topk_threshold(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5000, (), generator=gen))
    keys = C.selection_keys_reference(_grad(kind, n, gen))
    if seed % 2:  # ineligible slots, as the consistency pass leaves them
        keys[torch.rand(n, generator=gen) < 0.7] = -1
    for k in {1, n, int(torch.randint(1, n + 1, (), generator=gen))}:
        assert torch.equal(C.kth_largest_key(keys, k), C.kth_largest(keys, k)), k


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "extremes"])
@pytest.mark.parametrize("seed", range(2))
def test_radix_kernel_equals_topk_threshold(monkeypatch, device, kind, seed):
    pytest.importorskip("resu.compile.triton_selective")
    monkeypatch.setattr(registry, "use_triton", lambda *tensors: True)
    gen = torch.Generator().manual_seed(seed + 50)
    n = int(torch.randint(1, 12000, (), generator=gen))
    keys = C.selection_keys_reference(_grad(kind, n, gen))
    if seed % 2:
        keys[torch.rand(n, generator=gen) < 0.7] = -1
    keys = keys.to(device)
    for k in {1, n, int(torch.randint(1, n + 1, (), generator=gen))}:
        got = C.kth_largest_key(keys, k)
        assert got.device.type == device and got.shape == ()
        assert torch.equal(got, C.kth_largest(keys, k)), k


def test_kth_largest_key_refuses_a_bad_k():
    keys = C.selection_keys_reference(torch.randn(10))
    with pytest.raises(ValueError, match="`k`"):
        C.kth_largest_key(keys, 0)
    with pytest.raises(ValueError, match="`k`"):
        C.kth_largest_key(keys, 11)


@pytest.mark.parametrize("seed", range(3))
def test_consistency_selection_is_the_same_with_either_select(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 3000
    config = SelectionConfig(k_screen_ratio=0.5, k_select_ratio=0.2, tau_stable=0.3)
    emas = [torch.zeros(n), torch.zeros(n)]
    results = {}
    for name in ("topk", "radix"):
        monkeypatch.setattr(C, "select_impl", {} if name == "topk" else {"cpu": C.kth_largest_key})
        m, v = (t.clone() for t in emas)
        g2 = torch.Generator().manual_seed(seed + 100)
        out = []
        for _ in range(4):  # the EMAs build up, so later steps have eligible slots
            grad = torch.randn(n, generator=g2) + 0.5
            keys, threshold, sum_c, n_sel = C.consistency_selection(grad, m, v, config, maximize=False)
            out.append((keys >= threshold, threshold, n_sel))
        results[name] = out
    for (a_sel, a_thr, a_n), (b_sel, b_thr, b_n) in zip(results["topk"], results["radix"]):
        assert torch.equal(a_sel, b_sel) and torch.equal(a_thr, b_thr) and torch.equal(a_n, b_n)
    assert int(results["topk"][-1][2]) > 0
