"""Tampered checkpoints through the real load paths: ``model.load_state_dict`` and ``torch.load(weights_only=True)``.

Every inner tensor of every mode and mask encoding is truncated, extended or given out-of-range values
(and ``n_pruned`` shifted); each load must either be refused with the model unchanged bitwise, or be
accepted only when the loaded weight is really usable: its mask decodes to ``n_pruned`` distinct
slots, SPARSE pruned slots are zero, and its effective weight can be computed. The tampering is drawn
by Hypothesis; a deterministic sweep checks that every length change is refused.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import resu
from resu.tensors.mask import SparseMask
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter
from resu.tensors.validate import CheckpointError

SHAPE = (6, 11)  # 66 slots: an odd bitmap tail (2 padding bits)
NUMEL = SHAPE[0] * SHAPE[1]
N_PRUNED = {"pruned_indices": 2, "bitmap": 33, "active_indices": 64}  # what choose_encoding picks at 66 slots
CASES = ["dense"] + [f"{m}-{e}" for m in ("sparse", "resu") for e in N_PRUNED] + [
    f"qresu{b}-{s}-{e}" for b, s in ((4, "per_group"), (8, "per_channel"), (4, "per_tensor")) for e in N_PRUNED
]


def _model(case: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = resu.sparsify_(nn.Sequential(nn.Linear(SHAPE[1], SHAPE[0])))
    if case == "dense":
        return model
    mode, enc = case.rsplit("-", 1)
    resu.prune_(model, N_PRUNED[enc] / NUMEL, scope="global")
    gen = torch.Generator().manual_seed(seed)
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=gen)
    elif mode.startswith("qresu"):
        bits, scheme = mode[len("qresu"):].split("-")
        resu.enter_qresu_(model, bits=int(bits), scheme=scheme, group_size=4, epsilon=0.5, generator=gen)
    assert model[0].weight.resu_layout.encoding_name == (None if case == "dense" else enc)
    return model


@functools.lru_cache(maxsize=None)
def _source(case: str) -> dict:
    return {k: v.detach().clone() for k, v in _model(case, 1).state_dict().items()}


def _snapshot(model: nn.Module) -> list:
    out = []
    for p in model.parameters():
        if isinstance(p, ResuParameter):
            names, layout = p.__tensor_flatten__()
            out.append((layout.to_dict(), [getattr(p, k).clone() for k in names]))
        else:
            out.append((None, [p.detach().clone()]))
    return out


def _same(a: list, b: list) -> bool:
    return all(
        la == lb and len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))
        for (la, ta), (lb, tb) in zip(a, b)
    ) and len(a) == len(b)


def _rebuilt(p: ResuParameter, name: str, new: torch.Tensor = None, n_pruned_delta: int = 0) -> ResuParameter:
    """``p`` with inner tensor ``name`` replaced by ``new`` and/or ``n_pruned`` shifted, built without any check
    (as a hand-made or unflattened tensor would be)."""
    names, layout = p.__tensor_flatten__()
    inner = {k: getattr(p, k).clone() for k in names}
    if new is not None:
        inner[name] = new
    if n_pruned_delta:
        layout = layout.replace(n_pruned=layout.n_pruned + n_pruned_delta)
    return ResuParameter(layout, inner, shape=p.shape, requires_grad=p.requires_grad)


def _tamper(t: torch.Tensor, kind: str, amount: int, pos: int, numel: int) -> torch.Tensor:
    flat = t.reshape(-1).clone()
    if kind == "truncate":
        return flat[: max(0, flat.numel() - amount)]
    if kind == "extend":
        return torch.cat([flat, flat.new_zeros(amount) if flat.numel() == 0 else flat[:1].repeat(amount)])
    if flat.numel() == 0:
        return t.clone()
    i = pos % flat.numel()
    if t.is_floating_point():
        flat[i] = [float("nan"), float("inf"), -1e30][amount % 3]
    elif t.dtype == torch.uint8:
        flat[i] = 255 - flat[i]  # bitmap: flips every bit of a byte; codes: another code
    else:  # mask indices: outside [0, numel), negative, or a duplicate of the neighbour
        flat[i] = [numel, numel + amount, -1, flat[i - 1] if i else flat[min(1, flat.numel() - 1)]][amount % 4]
    return flat.reshape(t.shape)


def _usable(p: ResuParameter) -> None:
    """What an accepted weight must satisfy, checked without the validator under test."""
    if p.mode.has_mask:
        mask = SparseMask.from_storage(p._mask_storage, p.resu_layout.encoding, tuple(p.shape), p.n_pruned, validate=True)
        pruned = mask.pruned_indices
        assert pruned.numel() == p.n_pruned and torch.unique(pruned).numel() == p.n_pruned
        assert int((~p.active_mask).sum()) == p.n_pruned
        if p.mode is ResuMode.SPARSE:
            assert torch.equal(p._weight[~p.active_mask], torch.zeros_like(p._weight[~p.active_mask]))
    if p.mode is ResuMode.QRESU:
        assert p._theta.numel() == p.n_pruned
    assert p.effective_weight().shape == p.shape


def _load_into_model(case: str, tampered: ResuParameter) -> None:
    """``load_state_dict`` of the tampered entry into a model of the same case: refused unchanged, or usable."""
    target = _model(case, 2)
    before = _snapshot(target)
    sd = dict(_source(case))
    sd["0.weight"] = tampered
    try:
        target.load_state_dict(sd)
    except CheckpointError as err:
        assert err.name == "0.weight"
        assert _same(_snapshot(target), before), "a refused load changed the model"
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["accepted"] += 1
    _usable(target[0].weight)


def _load_pickle(tampered: ResuParameter) -> None:
    """``torch.load(weights_only=True)`` of the tampered parameter: refused, or usable."""
    buf = io.BytesIO()
    torch.save({"w": tampered}, buf)
    buf.seek(0)
    try:
        loaded = torch.load(buf, weights_only=True)["w"]
    except CheckpointError as err:
        assert "unpickled" in str(err)
        return
    _usable(loaded)


KINDS = ["truncate", "extend", "out_of_range"]
OUTCOMES = {"refused": 0, "accepted": 0}


@given(
    case=st.sampled_from(CASES),
    which=st.integers(0, 10),
    kind=st.sampled_from(KINDS + ["n_pruned"]),
    amount=st.integers(1, 9),
    pos=st.integers(0, 200),
)
def test_fuzz_tampered_checkpoints_are_refused_unchanged_or_usable(case, which, kind, amount, pos):
    p = _model(case, 1)[0].weight
    names = p.resu_layout.inner_names
    name = names[which % len(names)]
    if kind == "n_pruned":
        if not p.mode.has_mask:
            return
        delta = amount if p.n_pruned + amount <= NUMEL else -amount
        tampered = _rebuilt(p, name, n_pruned_delta=delta)
    else:
        tampered = _rebuilt(p, name, _tamper(getattr(p, name), kind, amount, pos, NUMEL))
    _load_into_model(case, tampered)
    _load_pickle(tampered)


@pytest.mark.parametrize("case", ["resu-bitmap", "qresu4-per_group-bitmap"])
def test_the_load_paths_accept_valid_values_and_refuse_bad_lengths(case):
    """Both outcomes of the fuzz above, on fixed inputs: an extreme value in a float inner tensor is
    valid data (accepted and usable); the same tensor one element short is refused, model unchanged."""
    p = _model(case, 1)[0].weight
    name = "_weight" if case.startswith("resu") else "_theta"
    before = dict(OUTCOMES)
    _load_into_model(case, _rebuilt(p, name, _tamper(getattr(p, name), "out_of_range", 2, 0, NUMEL)))
    assert OUTCOMES["accepted"] == before["accepted"] + 1
    _load_into_model(case, _rebuilt(p, name, _tamper(getattr(p, name), "truncate", 1, 0, NUMEL)))
    assert OUTCOMES["refused"] == before["refused"] + 1


@pytest.mark.parametrize("case", CASES)
def test_every_length_change_of_every_inner_tensor_is_refused_by_both_load_paths(case):
    p = _model(case, 1)[0].weight
    for name in p.resu_layout.inner_names:
        for kind in ("truncate", "extend"):
            t = getattr(p, name)
            if kind == "truncate" and t.numel() == 0:
                continue
            tampered = _rebuilt(p, name, _tamper(t, kind, 1, 0, NUMEL))
            target = _model(case, 2)
            before = _snapshot(target)
            sd = {**_source(case), "0.weight": tampered}
            with pytest.raises(CheckpointError) as info:
                target.load_state_dict(sd)
            assert info.value.name == "0.weight" and info.value.field.split(".")[0].split(" ")[0] in (name, "tensors")
            assert _same(_snapshot(target), before)
            buf = io.BytesIO()
            torch.save({"w": tampered}, buf)
            buf.seek(0)
            with pytest.raises(CheckpointError):
                torch.load(buf, weights_only=True)


@pytest.mark.parametrize("case", ["sparse-bitmap", "resu-bitmap", "qresu4-per_group-bitmap"])
def test_a_bitmap_with_one_extra_pruned_bit_is_refused(case):
    p = _model(case, 1)[0].weight
    flags = ~p.active_mask.reshape(-1)
    free = int((~flags).nonzero()[0, 0])
    storage = p._mask_storage.clone()
    storage[free // 8] |= 1 << (free % 8)
    target = _model(case, 2)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match="set bits"):
        target.load_state_dict({**_source(case), "0.weight": _rebuilt(p, "_mask_storage", storage)})
    assert _same(_snapshot(target), before)


def test_a_bad_entry_late_in_the_state_dict_leaves_earlier_modules_unloaded():
    # Two layers: the first entry is valid and the second corrupt; torch copies in order, so only a
    # check before any copy keeps the first layer as it was.
    def two(seed):
        torch.manual_seed(seed)
        m = resu.sparsify_(nn.Sequential(nn.Linear(SHAPE[1], SHAPE[0]), nn.Linear(SHAPE[0], SHAPE[0])))
        resu.prune_(m, 0.5)
        return m

    source, target = two(1), two(2)
    before = _snapshot(target)
    sd = source.state_dict()
    sd["1.weight"] = _rebuilt(sd["1.weight"], "_mask_storage", n_pruned_delta=1)
    with pytest.raises(CheckpointError, match="1.weight"):
        target.load_state_dict(sd)
    assert _same(_snapshot(target), before)


def test_a_plain_tensor_into_a_resu_weight_is_refused_before_any_copy():
    target = _model("resu-bitmap", 2)
    before = _snapshot(target)
    sd = {"0.weight": torch.randn(SHAPE), "0.bias": torch.randn(SHAPE[0])}
    with pytest.raises(RuntimeError, match="0.weight"):
        target.load_state_dict(sd)
    assert _same(_snapshot(target), before)


def test_quant_format_with_float_bits_is_refused_when_unpickled():
    p = _model("qresu4-per_group-bitmap", 1)[0].weight
    names, layout = p.__tensor_flatten__()
    data = layout.to_dict()
    data["qformat"]["bits"] = 4.0
    from resu.tensors.resu_parameter import _rebuild_resu_parameter

    with pytest.raises(CheckpointError, match="bits"):
        _rebuild_resu_parameter(data, {k: getattr(p, k) for k in names}, tuple(p.shape), True)


def test_strided_mask_storage_is_refused_by_the_mask_validator():
    p = _model("sparse-pruned_indices", 1)[0].weight
    storage = p._mask_storage
    strided = torch.stack([storage, storage], 1)[:, 0]
    assert torch.equal(strided, storage) and not strided.is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        SparseMask.from_storage(strided, p.resu_layout.encoding, tuple(p.shape), p.n_pruned, validate=True)


def test_enter_qresu_refuses_a_one_dimensional_weight_and_changes_nothing():
    class Vec(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(ResuParameter.from_weight(torch.randn(16)))

    model = Vec()
    model.w._apply_pruning_(torch.arange(16) % 2 == 0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="1-D"):
        resu.enter_qresu_(model)
    assert _same(_snapshot(model), before)


def test_enter_qresu_refuses_float_bits():
    model = _model("sparse-bitmap", 1)
    with pytest.raises(ValueError, match="bits"):
        resu.enter_qresu_(model, bits=4.0)
    assert model[0].weight.mode is ResuMode.SPARSE


# ---------------------------------------------------------------------- optimizer states


def _trained_optimizer(case: str, selective=None):
    model = _model(case, 1)
    if selective is not None:
        model[0].weight.set_selective(selective)
    opt = resu.ResuAdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, SHAPE[1])).square().sum().backward()
    opt.step()
    return model, opt


def _opt_snapshot(opt) -> list:
    return [(id(p), {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()})
            for g in opt.param_groups for p in g["params"]]


def _opt_same(a, b) -> bool:
    return len(a) == len(b) and all(
        pa == pb and sa.keys() == sb.keys() and all(
            torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
        for (pa, sa), (pb, sb) in zip(a, b)
    )


@pytest.mark.parametrize("case", ["dense", "sparse-bitmap", "resu-bitmap", "resu-pruned_indices", "qresu4-per_group-active_indices"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("delta", [-1, 1, 108])
def test_optimizer_states_of_the_wrong_length_are_refused_and_the_optimizer_is_unchanged(case, key, delta):
    model, opt = _trained_optimizer(case)
    sd = opt.state_dict()
    # The weight is the first parameter: its saved state keeps the weight's layout id, so it would be used as is.
    state = dict(sd["state"][0])
    flat = state[key].reshape(-1)
    state[key] = flat[:delta] if delta < 0 else torch.cat([flat, flat.new_zeros(delta)])
    tampered = {**sd, "state": {**sd["state"], 0: state}}
    before = _opt_snapshot(opt)
    with pytest.raises(CheckpointError, match=key):
        opt.load_state_dict(tampered)
    assert _opt_same(_opt_snapshot(opt), before)
    opt.load_state_dict(sd)  # the untampered state still loads


def test_selective_subset_out_of_range_is_refused():
    from resu.core.selective import SelectionConfig

    model, opt = _trained_optimizer("resu-bitmap", SelectionConfig(strategy="random", k_select_ratio=0.5))
    sd = opt.state_dict()
    state = dict(sd["state"][0])
    assert "subset" in state
    subset = state["subset"].clone()
    subset[-1] = NUMEL + 5
    before = _opt_snapshot(opt)
    with pytest.raises(CheckpointError, match="subset"):
        opt.load_state_dict({**sd, "state": {**sd["state"], 0: {**state, "subset": subset}}})
    assert _opt_same(_opt_snapshot(opt), before)
