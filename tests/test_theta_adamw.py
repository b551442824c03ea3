"""adamw_step_ on a compact θ vector: every slot, a bool mask, an index subset, or key ≥ threshold.

On CPU these run the references (bitwise equal to torch.optim.AdamW's single-tensor path); the
``cuda`` cases run the Triton kernels on a GPU against the CPU references.
"""

import pytest
import torch

from resu.optim.adamw_step import ALL, adamw_reference_, adamw_step_, key_at_least, subset, where

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)


def theta_adamw_(theta, grad, m, v, step, selected=None, **hyper):
    """``adamw_step_`` with the selection given as None, a bool mask or an index vector."""
    if selected is None:
        selection = ALL
    elif isinstance(selected, torch.Tensor) and selected.dtype == torch.bool:
        selection = where(selected)
    elif isinstance(selected, torch.Tensor) and selected.dtype in (torch.int32, torch.int64):
        selection = subset(selected)
    else:
        selection = where(selected)  # a wrong dtype: adamw_step_ must refuse it
    adamw_step_(theta, grad, m, v, step, selection=selection, **hyper)


def _torch_adamw_steps(theta, grads, maximize=False):
    """θ after torch.optim.AdamW (single tensor) with one gradient per step, and its states."""
    t = theta.clone().requires_grad_(True)
    opt = torch.optim.AdamW([t], lr=HYPER["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                            maximize=maximize, foreach=False)
    for g in grads:
        t.grad = g.clone()
        opt.step()
    st = opt.state[t]
    return t.detach(), st["exp_avg"], st["exp_avg_sq"]


@pytest.mark.parametrize("maximize", [False, True])
def test_every_slot_matches_torch_adamw_bitwise(maximize):
    theta = torch.randn(257)
    grads = [torch.randn(257) for _ in range(4)]
    m, v = torch.zeros(257), torch.zeros(257)
    ref, m_ref, v_ref = _torch_adamw_steps(theta, grads, maximize)
    for step, g in enumerate(grads, 1):
        theta_adamw_(theta, g, m, v, step, **{**HYPER, "maximize": maximize})
    assert torch.equal(theta, ref) and torch.equal(m, m_ref) and torch.equal(v, v_ref)


def test_bool_mask_updates_exactly_the_selected_slots_like_adamw_on_them():
    n = 300
    theta, m, v = torch.randn(n), torch.randn(n), torch.rand(n)
    selected = torch.rand(n) < 0.3
    grad = torch.randn(n)
    before = (theta.clone(), m.clone(), v.clone())
    theta_adamw_(theta, grad, m, v, 5, **HYPER, selected=selected)
    for now, then in zip((theta, m, v), before):
        assert torch.equal(now[~selected], then[~selected])  # bitwise untouched
        assert (now[selected] != then[selected]).all()
    # The selected slots follow AdamW on the gathered sub-vector.
    sub, sm, sv = before[0][selected].clone(), before[1][selected].clone(), before[2][selected].clone()
    adamw_reference_(sub, grad[selected], sm, sv, 5, **HYPER)
    assert torch.equal(theta[selected], sub) and torch.equal(m[selected], sm) and torch.equal(v[selected], sv)


def test_index_subset_has_compact_states_and_touches_nothing_else():
    n, k = 500, 60
    theta = torch.randn(n)
    subset = torch.randperm(n)[:k].sort().values
    grads = [torch.randn(n) for _ in range(3)]
    m, v = torch.zeros(k), torch.zeros(k)
    ref, m_ref, v_ref = _torch_adamw_steps(theta[subset], [g[subset] for g in grads])
    before = theta.clone()
    for step, g in enumerate(grads, 1):
        theta_adamw_(theta, g, m, v, step, **HYPER, selected=subset)
    rest = torch.ones(n, dtype=torch.bool)
    rest[subset] = False
    assert torch.equal(theta[rest], before[rest])
    assert torch.equal(theta[subset], ref) and torch.equal(m, m_ref) and torch.equal(v, v_ref)


def test_key_threshold_is_the_mask_key_ge_threshold():
    n = 400
    theta, m, v, grad = torch.randn(n), torch.randn(n), torch.rand(n), torch.randn(n)
    keys = torch.randint(-1, 1000, (n,), dtype=torch.int64)
    threshold = keys.float().quantile(0.7).to(torch.int64)
    a = (theta.clone(), m.clone(), v.clone())
    adamw_step_(theta, grad, m, v, 2, selection=key_at_least(keys, threshold), **HYPER)
    theta_adamw_(*a[:1], grad, *a[1:], 2, **HYPER, selected=keys >= threshold)
    assert torch.equal(theta, a[0]) and torch.equal(m, a[1]) and torch.equal(v, a[2])


@pytest.mark.parametrize(
    "make, name",
    [
                (lambda: (torch.randn(20), torch.randn(19), torch.zeros(20), torch.zeros(20), None), "grad"),
        (lambda: (torch.randn(20), torch.randn(20), torch.zeros(19), torch.zeros(20), None), "exp_avg"),
        (lambda: (torch.randn(20), torch.randn(20), torch.zeros(20), torch.zeros(3), torch.tensor([1, 4, 7])), "exp_avg"),
        (lambda: (torch.randn(20), torch.randn(20), torch.zeros(20), torch.zeros(20), torch.ones(19, dtype=torch.bool)), "selection"),
        (lambda: (torch.randn(20), torch.randn(20), torch.zeros(20), torch.zeros(20), torch.ones(20)), "selection"),
    ],
)
def test_bad_shapes_raise_naming_the_argument_and_change_nothing(make, name):
    theta, grad, m, v, selected = make()
    before = theta.clone()
    with pytest.raises(ValueError, match=name):
        theta_adamw_(theta, grad, m, v, 1, **HYPER, selected=selected)
    assert torch.equal(theta, before)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["all", "mask", "index", "key"])
@pytest.mark.parametrize("maximize", [False, True])
def test_cuda_kernels_match_the_cpu_reference(mode, maximize):
    n = 100_003
    theta, grad, m, v = torch.randn(n), torch.randn(n), torch.randn(n), torch.rand(n)
    hyper = {**HYPER, "maximize": maximize}
    keys = torch.randint(-1, 10**6, (n,), dtype=torch.int64)
    threshold = torch.tensor(600_000, dtype=torch.int64)
    selected = {"all": None, "mask": torch.rand(n) < 0.4, "index": torch.randperm(n)[:5000].sort().values, "key": None}[mode]
    if mode == "index":
        m, v = m[:5000].clone(), v[:5000].clone()
    cpu = [t.clone() for t in (theta, m, v)]
    gpu = [t.cuda() for t in (theta, m, v)]
    if mode == "key":
        adamw_step_(*cpu[:1], grad, *cpu[1:], 3, selection=key_at_least(keys, threshold), **hyper)
        adamw_step_(*gpu[:1], grad.cuda(), *gpu[1:], 3, selection=key_at_least(keys.cuda(), threshold.cuda()), **hyper)
    else:
        theta_adamw_(*cpu[:1], grad, *cpu[1:], 3, **hyper, selected=selected)
        theta_adamw_(*gpu[:1], grad.cuda(), *gpu[1:], 3, **hyper,
                     selected=None if selected is None else selected.cuda())
    # The unselected slots, from the selection itself (a selected slot's step may round back to its old value).
    untouched = torch.zeros(n, dtype=torch.bool)
    if mode == "mask":
        untouched = ~selected
    elif mode == "index":
        untouched[:] = True
        untouched[selected] = False
    elif mode == "key":
        untouched = keys < threshold
    assert torch.equal(gpu[0].cpu()[untouched], theta[untouched])
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
