"""ResuAdamW: AdamW semantics on plain parameters, trainable-slot-only updates on ResuParameters."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import resu
from resu.tensors.mode import ResuMode
from tests.helpers import model_in_mode, train_classifier




@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_plain_parameters_match_torch_adamw(amsgrad, maximize):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 5))
    b = copy.deepcopy(a)
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    train_classifier(a, resu.ResuAdamW(a.parameters(), **kw))
    train_classifier(b, torch.optim.AdamW(b.parameters(), foreach=False, **kw))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)


def test_dense_resu_parameter_matches_torch_adamw():
    plain = model_in_mode("dense")
    ref = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 5))
    ref.load_state_dict({k: (v.effective_weight() if isinstance(v, resu.ResuParameter) else v) for k, v in plain.state_dict().items()})
    train_classifier(plain, resu.ResuAdamW(plain.parameters(), lr=1e-2, weight_decay=0.1))
    train_classifier(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False))
    for p, r in zip(plain.parameters(), ref.parameters()):
        w = p.effective_weight() if isinstance(p, resu.ResuParameter) else p
        torch.testing.assert_close(w, r, rtol=0, atol=1e-7)


def test_sparse_mode_trains_active_slots_only_and_keeps_pruned_zero():
    model = model_in_mode("sparse", sparsity=0.6)
    p = model[0].weight
    active = p.active_mask
    before = p.effective_weight().clone()
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_classifier(model, opt, steps=4)
    after = p.effective_weight()
    assert torch.all(after[~active] == 0)
    assert (after[active] != before[active]).float().mean() > 0.9
    assert opt.state[p]["exp_avg"].shape == (int(active.sum()),)


def test_resu_mode_freezes_active_slots_bitwise_with_weight_decay():
    model = model_in_mode("resu", sparsity=0.5)
    rps = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    before = [(p.effective_weight().clone(), p.active_mask) for p in rps]
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    train_classifier(model, opt, steps=5)
    for p, (w0, active) in zip(rps, before):
        w1 = p.effective_weight()
        assert torch.equal(w1[active], w0[active])
        assert (w1[~active] != w0[~active]).float().mean() > 0.9
        assert opt.state[p]["exp_avg"].shape == (p.n_pruned,)
        assert opt.state[p]["exp_avg_sq"].shape == (p.n_pruned,)


def test_theta_update_matches_adamw_on_the_theta_vector():
    """θ follows exactly the AdamW trajectory of a plain vector fed the θ gradients."""
    model = model_in_mode("resu", sparsity=0.5)
    p = model[0].weight
    active = p.active_mask
    theta = p.effective_weight()[~active].clone().requires_grad_(True)
    opt = resu.ResuAdamW([p], lr=1e-2, weight_decay=0.2)
    ref_opt = torch.optim.AdamW([theta], lr=1e-2, weight_decay=0.2, foreach=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(8, 12, generator=g)
        opt.zero_grad()
        model[0](x).pow(2).sum().backward()
        theta.grad = p.grad.values.clone()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(p.effective_weight()[~active], theta.detach(), rtol=0, atol=1e-7)


def test_state_storage_is_reused_from_sparse_to_resu():
    model = model_in_mode("sparse", sparsity=0.4)
    p = model[0].weight
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    train_classifier(model, opt, steps=2)
    ptrs = {k: opt.state[p][k].untyped_storage().data_ptr() for k in ("exp_avg", "exp_avg_sq")}
    resu.enter_resu_(model, epsilon=0.1)
    train_classifier(model, opt, steps=2)
    assert opt.state[p]["exp_avg"].shape == (p.n_pruned,)
    assert opt.state[p]["step"].item() == 2  # restarted for the new slot set
    for k, ptr in ptrs.items():
        assert opt.state[p][k].untyped_storage().data_ptr() == ptr


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    ],
)
def test_stock_optimizer_refuses_resu_weights_and_moves_nothing(make_opt):
    model = model_in_mode("resu")
    rps = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    before = [p.effective_weight().clone() for p in rps]
    opt = make_opt(rps)
    nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 5, (8,))).backward()
    with pytest.raises(RuntimeError, match="ResuAdamW"):
        opt.step()
    for p, w0 in zip(rps, before):
        assert torch.equal(p.effective_weight(), w0)


def test_lr_scheduler_drives_the_update():
    model = model_in_mode("resu")
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    train_classifier(model, opt, steps=1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.effective_weight().clone() for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    train_classifier(model, opt, steps=1)
    after = [p.effective_weight() for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_optimizer_state_dict_round_trip_continues_identically():
    model = model_in_mode("resu")
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_classifier(model, opt, steps=2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    fresh = resu.sparsify_(nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 5)))
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = resu.ResuAdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh[0].weight.mode is ResuMode.RESU
    train_classifier(model, opt, steps=2, seed=7)
    train_classifier(fresh, fresh_opt, steps=2, seed=7)
    for a, b in zip(model.parameters(), fresh.parameters()):
        wa = a.effective_weight() if isinstance(a, resu.ResuParameter) else a
        wb = b.effective_weight() if isinstance(b, resu.ResuParameter) else b
        assert torch.equal(wa, wb)


def test_bad_hyperparameters_name_the_argument():
    params = [nn.Parameter(torch.randn(3))]
    for kw, name in [({"lr": -1.0}, "lr"), ({"eps": -1.0}, "eps"), ({"betas": (1.0, 0.9)}, "betas"),
                     ({"weight_decay": -0.1}, "weight_decay"), ({"capturable": True}, "capturable")]:
        with pytest.raises(ValueError, match=name):
            resu.ResuAdamW(params, **kw)
