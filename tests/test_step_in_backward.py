"""StepInBackward: each parameter stepped inside backward() takes the step a shared ResuAdamW takes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.optim import StepInBackward


def model_in(mode: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    resu.sparsify_(model)
    resu.prune_(model, 0.5)
    gen = torch.Generator().manual_seed(seed)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=gen)
    elif mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, epsilon=0.5, generator=gen)
    return model


def data(steps: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 12, generator=g), torch.randn(6, 4, generator=g)) for _ in range(steps)]


def train(model, opt, batches) -> None:
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def snapshot(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            out.update({f"{name}.{k}": t.clone() for k, t in p._inner().items()})
        else:
            out[name] = p.detach().clone()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_same_weights_and_states_as_a_shared_optimizer(mode):
    batches = data(4)
    shared_model, hooked_model = model_in(mode), model_in(mode)
    shared = resu.ResuAdamW(shared_model.parameters(), lr=1e-2, weight_decay=0.1)
    hooked = StepInBackward(hooked_model.parameters(), lr=1e-2, weight_decay=0.1)
    train(shared_model, shared, batches)
    train(hooked_model, hooked, batches)
    assert_same(snapshot(shared_model), snapshot(hooked_model))
    for p, q, opt in zip(shared_model.parameters(), hooked_model.parameters(), hooked.optimizers):
        assert shared.state[p].keys() == opt.state[q].keys()
        for key, value in shared.state[p].items():
            if key == "layout_id":  # which layout object the states belong to: each weight's own
                continue
            other = opt.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_each_gradient_is_stepped_and_dropped_before_backward_reaches_the_earlier_layers():
    model = model_in("qresu")
    opt = StepInBackward(model.parameters(), lr=1e-2)  # noqa: F841  (kept: the hooks live as long as it)
    first, last = model[0].weight, model[4].weight
    seen = {}
    # Registered after StepInBackward's hook: runs right after the first layer's step.
    first.register_post_accumulate_grad_hook(lambda p: seen.setdefault("last layer's grad", last.grad))
    theta_before = last._theta.clone()
    x, y = data(1)[0]
    F.mse_loss(model(x), y).backward()
    assert "last layer's grad" in seen and seen["last layer's grad"] is None
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(last._theta, theta_before)


def test_resume_from_state_dict_matches_the_uninterrupted_run():
    batches = data(5)
    model = model_in("resu")
    opt = StepInBackward(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, batches[:3])
    # Copies: state_dict() returns the live tensors, which the next steps update in place.
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batches[3:])

    resumed = model_in("resu", seed=3)  # another init: the load must replace everything
    resumed.load_state_dict(saved_model)
    ropt = StepInBackward(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    ropt.load_state_dict(saved_opt)
    train(resumed, ropt, batches[3:])
    assert_same(snapshot(model), snapshot(resumed))


def test_custom_factory_param_groups_and_remove():
    model = model_in("resu")
    opt = StepInBackward(model.parameters(), optimizer_factory=lambda ps: resu.ResuAdamW(ps, lr=0.0))
    assert len(opt.param_groups) == len(list(model.parameters()))
    before = snapshot(model)
    x, y = data(1)[0]
    F.mse_loss(model(x), y).backward()
    assert_same(before, snapshot(model))  # lr 0 and no weight decay: nothing moved
    for group in opt.param_groups:
        group["lr"] = 1e-2
    F.mse_loss(model(x), y).backward()
    assert not torch.equal(before["2.weight._weight"], model[2].weight._weight)
    opt.remove()
    F.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_input_is_refused_naming_the_fix():
    model = model_in("resu")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="listed twice"):
        StepInBackward(params + params[:1])
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match=r"`params`\[0\] is not a leaf tensor that requires grad"):
        StepInBackward([frozen])
    with pytest.raises(ValueError, match="inside the factory"):
        StepInBackward(params, optimizer_factory=lambda ps: resu.ResuAdamW(ps), lr=1.0)
    with pytest.raises(ValueError, match="empty"):
        StepInBackward([])
    with pytest.raises(ValueError, match="not param-group dicts"):
        StepInBackward([{"params": params, "weight_decay": 0.1}])
    opt = StepInBackward(params, lr=1e-2)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="one per parameter"):
        opt.load_state_dict({"optimizers": []})


def test_a_failed_load_leaves_every_optimizer_as_it_was():
    batches = data(2)
    model = model_in("resu")
    opt = StepInBackward(model.parameters(), lr=1e-2)
    train(model, opt, batches)
    good = opt.state_dict()
    other = model_in("resu", seed=5)
    other_opt = StepInBackward(other.parameters(), lr=1e-2)
    train(other, other_opt, batches[:1])
    before = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in o.state[p].items()} for o, p in zip(other_opt.optimizers, other.parameters())]
    broken = {"optimizers": list(good["optimizers"])}
    last = len(broken["optimizers"]) - 1
    broken["optimizers"][last] = {"state": {}, "param_groups": []}  # the last entry does not fit
    with pytest.raises(ValueError, match=rf"entry {last} does not fit `params`\[{last}\]"):
        other_opt.load_state_dict(broken)
    for o, p, states in zip(other_opt.optimizers, other.parameters(), before):
        for key, value in states.items():
            now = o.state[p][key]
            assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, key


def _hook_count(p) -> int:
    return len(p._post_accumulate_grad_hooks or {})


def _trained_and_dropped(stepper_class=StepInBackward):
    """A QRESU model that took one step through ``stepper_class``, then weak references to its
    parameters and optimizers, with the model and the stepper deleted."""
    import weakref

    model = model_in("qresu")
    opt = stepper_class(model.parameters(), lr=1e-2)
    x, y = data(1)[0]
    F.mse_loss(model(x), y).backward()
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(o) for o in opt.optimizers]
    del model, opt
    return refs


def test_no_reference_cycle_keeps_a_deleted_model_alive():
    import gc

    _trained_and_dropped()  # first use: torch's lazily built caches, which live for the process
    gc.collect()
    gc.disable()  # from here on only reference counting frees anything
    try:
        assert all(r() is None for r in _trained_and_dropped())

        class NoCleanup(StepInBackward):  # the hooks alone must not keep anything alive either
            def __del__(self):
                pass

        assert all(r() is None for r in _trained_and_dropped(NoCleanup))
    finally:
        gc.enable()


def test_deleting_it_takes_the_hooks_off():
    model = model_in("resu")
    before = [_hook_count(p) for p in model.parameters()]
    opt = StepInBackward(model.parameters(), lr=1e-2)
    assert [_hook_count(p) for p in model.parameters()] == [n + 1 for n in before]
    del opt
    assert [_hook_count(p) for p in model.parameters()] == before
    x, y = data(1)[0]
    F.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())  # accumulated as usual, nothing stepped


def test_selective_consistency_steps_as_a_shared_optimizer():
    batches = data(3)
    config = resu.SelectionConfig(k_screen_ratio=0.5, k_select_ratio=0.5, tau_stable=0.3)
    shared_model, hooked_model = model_in("resu"), model_in("resu")
    shared = resu.ResuAdamW(shared_model.parameters(), lr=1e-2, selective=config)
    hooked = StepInBackward(hooked_model.parameters(), lr=1e-2, selective=config)
    train(shared_model, shared, batches)
    train(hooked_model, hooked, batches)
    assert_same(snapshot(shared_model), snapshot(hooked_model))


def test_a_stock_optimizer_gets_the_gradient_the_layer_asked_for():
    # RESULinear in RESU mode with stock_optimizer=True hands stock torch.optim optimizers a dense
    # gradient; stepping in backward must not turn it back into a compact one.
    from resu.modules.linear import RESULinear

    def layer():
        torch.manual_seed(0)
        out = RESULinear(12, 4)
        out.prune_by_magnitude(0.5)
        out.enter_resu_mode(epsilon=0.5, generator=torch.Generator().manual_seed(0))
        return out

    x, y = data(1)[0]
    shared_layer, hooked_layer = layer(), layer()
    shared = torch.optim.Adam(shared_layer.parameters(), lr=1e-2)
    F.mse_loss(shared_layer(x), y).backward()
    shared.step()
    hooked = StepInBackward(hooked_layer.parameters(), optimizer_factory=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    F.mse_loss(hooked_layer(x), y).backward()
    assert len(hooked.optimizers) == 2
    assert torch.equal(shared_layer.weight.effective_weight(), hooked_layer.weight.effective_weight())
    assert torch.equal(shared_layer.bias.detach(), hooked_layer.bias.detach())
