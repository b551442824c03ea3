"""Bad inputs to the model-level API (sparsify_, prune_, enter_resu_, exit_resu_, densify_).

Every failure must raise an error whose message names the offending argument (or the call that
fixes the problem) and must leave the model exactly as it was: same parameter objects, same types,
same modes, the same weight bits and the same mask bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import resu
from resu import ResuMode, ResuParameter

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (bitwise comparison, NaN and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 10),
        nn.ReLU(),
        nn.Linear(10, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 5, bias=False),
    )


def build(state: str) -> nn.Sequential:
    """A small model in one of the states the API moves between."""
    model = make_mlp()
    if state == "plain":
        return model
    resu.sparsify_(model)
    if state == "dense":
        return model
    resu.prune_(model, 0.5, generator=torch.Generator().manual_seed(1))
    if state == "sparse":
        return model
    resu.enter_resu_(model, 0.1, generator=torch.Generator().manual_seed(2))
    assert state == "resu"
    return model


def snapshot(model: nn.Module) -> list[dict]:
    """Everything an API call could change about a model's parameters and modules."""
    snap = []
    for name, p in model.named_parameters(remove_duplicate=False):
        entry = {
            "name": name,
            "id": id(p),
            "type": type(p),
            "requires_grad": p.requires_grad,
            "dtype": p.dtype,
            "shape": tuple(p.shape),
        }
        if isinstance(p, ResuParameter):
            entry["mode"] = p.mode
            entry["bits"] = bits(p.effective_weight())
            entry["n_pruned"] = p.n_pruned
            mask = p.mask
            if mask is None:
                entry["mask"] = None
            else:
                entry["mask"] = (mask.encoding, bits(mask.storage), bits(p.active_mask))
        else:
            entry["mode"] = None
            entry["bits"] = bits(p)
        snap.append(entry)
    modules = [(name, type(m), m.training) for name, m in model.named_modules(remove_duplicate=False)]
    return [snap, modules]


def assert_same(before, after) -> None:
    (params_b, modules_b), (params_a, modules_a) = before, after
    assert modules_a == modules_b
    assert [p["name"] for p in params_a] == [p["name"] for p in params_b]
    for b, a in zip(params_b, params_a):
        for key in ("id", "type", "requires_grad", "dtype", "shape", "mode", "n_pruned"):
            assert a.get(key) == b.get(key), (b["name"], key)
        assert torch.equal(a["bits"], b["bits"]), b["name"]
        if "mask" in b:
            if b["mask"] is None:
                assert a["mask"] is None, b["name"]
            else:
                enc_b, storage_b, active_b = b["mask"]
                enc_a, storage_a, active_a = a["mask"]
                assert enc_a == enc_b, b["name"]
                assert torch.equal(storage_a, storage_b), b["name"]
                assert torch.equal(active_a, active_b), b["name"]


def calib_batches(n: int = 3, in_features: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, in_features, generator=g) for _ in range(n)]


def test_helper_states_are_what_they_claim():
    """The fixtures below depend on these states; check them once."""
    assert not any(isinstance(p, ResuParameter) for p in build("plain").parameters())
    for state, mode in (("dense", ResuMode.DENSE), ("sparse", ResuMode.SPARSE), ("resu", ResuMode.RESU)):
        model = build(state)
        modes = [p.mode for p in model.parameters() if isinstance(p, ResuParameter)]
        assert modes == [mode] * 3
        # the snapshot notices a change (so an unchanged snapshot means something)
        before = snapshot(model)
        with torch.no_grad():
            model[2].bias.add_(1.0)
        with pytest.raises(AssertionError):
            assert_same(before, snapshot(model))


# --------------------------------------------------------------------------
# prune_: sparsity, method, scope, calib
# --------------------------------------------------------------------------

BAD_SPARSITY = [-0.1, -1e-9, 1.0000001, 1.5, 2, float("nan"), float("inf"), "0.5", None, True]


@pytest.mark.parametrize("state", ["dense", "sparse"])
@pytest.mark.parametrize("sparsity", BAD_SPARSITY, ids=repr)
def test_prune_bad_sparsity(state, sparsity):
    model = build(state)
    before = snapshot(model)
    with pytest.raises(ValueError, match="sparsity"):
        resu.prune_(model, sparsity)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_prune_bad_sparsity_checked_for_every_method(method):
    model = build("dense")
    before = snapshot(model)
    with pytest.raises(ValueError, match="sparsity"):
        resu.prune_(model, float("nan"), method=method)
    with pytest.raises(ValueError, match="sparsity"):
        resu.prune_(model, 1.2, method="wanda", calib=calib_batches())
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("state", ["dense", "sparse"])
@pytest.mark.parametrize("method", ["l1", "Magnitude", "", None, "wanda "])
def test_prune_unknown_method(state, method):
    model = build(state)
    before = snapshot(model)
    with pytest.raises(ValueError, match="method"):
        resu.prune_(model, 0.5, method=method)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("state", ["dense", "sparse"])
@pytest.mark.parametrize("scope", ["layer", "Row", "", None, "columns"])
def test_prune_unknown_scope(state, scope):
    model = build(state)
    before = snapshot(model)
    with pytest.raises(ValueError, match="scope"):
        resu.prune_(model, 0.5, scope=scope)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("state", ["dense", "sparse"])
def test_wanda_without_calib(state):
    model = build(state)
    before = snapshot(model)
    with pytest.raises(ValueError, match="calib"):
        resu.prune_(model, 0.5, method="wanda")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("state", ["dense", "sparse"])
@pytest.mark.parametrize("empty", [list, tuple, lambda: iter(())], ids=["list", "tuple", "iterator"])
def test_wanda_with_empty_calib(state, empty):
    model = build(state)
    model.train()
    before = snapshot(model)  # includes every module's training flag
    with pytest.raises(ValueError, match="calib"):
        resu.prune_(model, 0.5, method="wanda", calib=empty())
    assert_same(before, snapshot(model))


def test_wanda_empty_calib_keeps_eval_flags():
    model = build("dense")
    model.eval()
    model[0].train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="calib"):
        resu.prune_(model, 0.5, method="wanda", calib=[])
    assert_same(before, snapshot(model))


def test_wanda_calib_that_misses_a_layer():
    model = build("dense")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"saw no input during calibration"):
        resu.prune_(model, 0.5, method="wanda", calib=calib_batches(), forward_fn=lambda m, b: m[0](b))
    assert_same(before, snapshot(model))


def test_wanda_unknown_batch_type_points_to_forward_fn():
    model = build("dense")
    before = snapshot(model)
    with pytest.raises(TypeError, match="forward_fn"):
        resu.prune_(model, 0.5, method="wanda", calib=[object()])
    assert_same(before, snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_wanda_forward_fn_failure_leaves_no_hooks():
    model = build("sparse")
    model.train()
    before = snapshot(model)

    def failing(m, batch):
        m(batch)
        raise RuntimeError("calibration batch exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        resu.prune_(model, 0.5, method="wanda", calib=calib_batches(), forward_fn=failing)
    assert_same(before, snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------
# mode errors
# --------------------------------------------------------------------------


def test_enter_resu_on_dense_model():
    model = build("dense")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`0\.weight` has no mask.*resu\.prune_\(model"):
        resu.enter_resu_(model, 0.1)
    assert_same(before, snapshot(model))


def test_enter_resu_on_partly_pruned_model_changes_nothing():
    """One weight still DENSE: the SPARSE ones must not enter RESU either."""
    model = make_mlp()
    resu.sparsify_(model, filter_fn=lambda name, m: name != "4")
    resu.prune_(model, 0.5)
    resu.sparsify_(model, filter_fn=lambda name, m: name == "4")  # converted after pruning: DENSE
    assert [p.mode for p in model.parameters() if isinstance(p, ResuParameter)] == [
        ResuMode.SPARSE,
        ResuMode.SPARSE,
        ResuMode.DENSE,
    ]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`4\.weight` has no mask.*prune_"):
        resu.enter_resu_(model, 0.1)
    assert_same(before, snapshot(model))


def test_enter_resu_twice():
    model = build("resu")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already in RESU mode.*exit_resu_\(model\)"):
        resu.enter_resu_(model, 0.1)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("epsilon", [-0.1, -1e-12, float("nan"), float("inf"), float("-inf"), "0.1", None, True])
def test_enter_resu_bad_epsilon(epsilon):
    model = build("sparse")
    before = snapshot(model)
    with pytest.raises(ValueError, match="epsilon"):
        resu.enter_resu_(model, epsilon)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("state", ["dense", "sparse"])
def test_exit_resu_when_nothing_in_resu(state):
    model = build(state)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`model`.*enter_resu_"):
        resu.exit_resu_(model)
    with pytest.raises(ValueError, match=r"`model`.*enter_resu_"):
        resu.exit_resu_(model, commit=False)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["magnitude", "random", "wanda"])
@pytest.mark.parametrize("scope", ["row", "global"])
def test_prune_while_in_resu(method, scope):
    model = build("resu")
    before = snapshot(model)
    calib = calib_batches() if method == "wanda" else None
    with pytest.raises(ValueError, match=r"RESU mode.*exit_resu_\(model\)"):
        resu.prune_(model, 0.3, method=method, scope=scope, calib=calib)
    assert_same(before, snapshot(model))


# --------------------------------------------------------------------------
# sparsify_ errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["dense", "sparse", "resu"])
def test_sparsify_twice(state):
    model = build(state)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`0\.weight` is already a ResuParameter.*sparsify_ was called twice"):
        resu.sparsify_(model)
    assert_same(before, snapshot(model))


def test_sparsify_twice_with_partial_overlap_changes_nothing():
    """A second call that selects one converted and one plain layer converts neither."""
    model = make_mlp()
    resu.sparsify_(model, filter_fn=lambda name, m: name == "2")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`2\.weight` is already a ResuParameter"):
        resu.sparsify_(model)
    assert_same(before, snapshot(model))
    assert type(model[0].weight) is nn.Parameter
    assert type(model[4].weight) is nn.Parameter


def _with_int_weight(position: int, dtype: torch.dtype) -> nn.Sequential:
    model = make_mlp()
    lin = model[position]
    g = torch.Generator().manual_seed(3)
    values = torch.randint(-50, 50, lin.weight.shape, generator=g).to(dtype)
    assert values.abs().sum() > 0
    lin.weight = nn.Parameter(values, requires_grad=False)
    return model


@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8])
def test_sparsify_integer_weight_converts_nothing(position, dtype):
    model = _with_int_weight(position, dtype)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"`{position}\.weight` has dtype {dtype}.*filter_fn"):
        resu.sparsify_(model)
    assert_same(before, snapshot(model))
    for i in (0, 2, 4):
        assert type(model[i].weight) is nn.Parameter
    assert model[position].weight.dtype == dtype


def test_sparsify_integer_weight_excluded_by_filter_fn():
    """The fix the error message suggests works: the other layers are converted."""
    model = _with_int_weight(2, torch.int64)
    resu.sparsify_(model, filter_fn=lambda name, m: m.weight.is_floating_point())
    assert type(model[0].weight) is ResuParameter
    assert type(model[4].weight) is ResuParameter
    assert type(model[2].weight) is nn.Parameter
    assert model[2].weight.dtype == torch.int64


# --------------------------------------------------------------------------
# never sparsified / not a module
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: resu.prune_(m, 0.5),
        lambda m: resu.prune_(m, 0.5, method="random"),
        lambda m: resu.prune_(m, 0.5, method="wanda", calib=calib_batches()),
        lambda m: resu.enter_resu_(m, 0.1),
        lambda m: resu.exit_resu_(m),
    ],
    ids=["prune_magnitude", "prune_random", "prune_wanda", "enter_resu_", "exit_resu_"],
)
def test_never_sparsified(call):
    model = build("plain")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"resu\.sparsify_\(model\)"):
        call(model)
    assert_same(before, snapshot(model))


def test_never_sparsified_after_filter_excluding_everything():
    model = make_mlp()
    resu.sparsify_(model, filter_fn=lambda name, m: False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"sparsify_"):
        resu.prune_(model, 0.5)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "call",
    [
        resu.sparsify_,
        resu.densify_,
        lambda m: resu.prune_(m, 0.5),
        lambda m: resu.enter_resu_(m, 0.1),
        resu.exit_resu_,
    ],
    ids=["sparsify_", "densify_", "prune_", "enter_resu_", "exit_resu_"],
)
@pytest.mark.parametrize(
    "not_a_module",
    [lambda: "model", lambda: torch.randn(3, 4), lambda: {"fc": nn.Linear(2, 2)}, lambda: [nn.Linear(2, 2)]],
    ids=["str", "tensor", "dict", "list"],
)
def test_not_a_module_is_a_type_error(call, not_a_module):
    with pytest.raises(TypeError, match="model"):
        call(not_a_module())


def test_tensor_is_left_alone_by_type_error():
    t = torch.randn(6, 5)
    b = bits(t)
    with pytest.raises(TypeError, match="model"):
        resu.sparsify_(t)
    assert type(t) is torch.Tensor
    assert torch.equal(bits(t), b)


# --------------------------------------------------------------------------
# strict types: 4.0 is not 4, True is not 1
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(bits=4.0), "bits"),
        (dict(bits=8.0), "bits"),
        (dict(bits=True), "bits"),
        (dict(bits="4"), "bits"),
        (dict(bits=3), "bits"),
        (dict(scheme="per_group", group_size=4.0), "group_size"),
        (dict(scheme="per_group", group_size=True), "group_size"),
        (dict(scheme="per_group", group_size=0), "group_size"),
        (dict(epsilon="0.1"), "epsilon"),
        (dict(epsilon=True), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(generator=0), "generator"),
    ],
    ids=repr,
)
def test_enter_qresu_refuses_loose_types(kwargs, name):
    model = build("sparse")
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"enter_qresu_: `{name}`"):
        resu.enter_qresu_(model, **kwargs)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("call", [lambda m: resu.enter_resu_(m, 0.1, generator=1), lambda m: resu.prune_(m, 0.5, generator="seed")])
def test_generator_must_be_a_torch_generator(call):
    model = build("sparse")
    before = snapshot(model)
    with pytest.raises(ValueError, match="`generator` must be a torch.Generator"):
        call(model)
    assert_same(before, snapshot(model))


# --------------------------------------------------------------------------
# calibration with NaN / inf activations, and the meta device
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("state", ["dense", "sparse"])
def test_wanda_with_non_finite_activations_names_the_layer(bad, state):
    model = build(state)
    before = snapshot(model)
    calib = calib_batches()
    calib[1][2, 5] = bad
    with pytest.raises(ValueError, match=r"prune_: the calibration inputs of layer `0` hold NaN or infinite values"):
        resu.prune_(model, 0.5, method="wanda", calib=calib)
    assert_same(before, snapshot(model))


def test_non_finite_activations_of_a_later_layer_name_that_layer():
    model = build("dense")
    with torch.no_grad():
        model[2].weight.mul_(1e30)  # finite inputs, overflowing activations two layers on
        model[2].bias.fill_(1e38)
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer `4`"):
        resu.prune_(model, 0.5, method="wanda", calib=[b * 1e10 for b in calib_batches()])
    assert_same(before, snapshot(model))


def test_commit_and_stabilize_with_non_finite_activations_change_nothing():
    model = build("resu")
    before = snapshot(model)
    calib = calib_batches()
    calib[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="commit_: the calibration inputs of layer `0`"):
        resu.commit_(model, "wanda_reprune", calib=calib)
    assert_same(before, snapshot(model))
    model = build("sparse")
    before = snapshot(model)
    with pytest.raises(ValueError, match="stabilize_: the calibration inputs of layer `0`"):
        resu.stabilize_(model, calib)
    assert_same(before, snapshot(model))


def test_prune_on_the_meta_device_explains_itself():
    with torch.device("meta"):
        model = make_mlp()
    resu.sparsify_(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(ValueError, match=r"`0\.weight` is on the meta device.*to_empty"):
        resu.prune_(model, 0.5)
    assert all(p.mode is ResuMode.DENSE for p in model.parameters() if isinstance(p, ResuParameter))
