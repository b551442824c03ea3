"""Validation of untrusted data: tampered ResuParameter layouts, optimizer states and kernel launches.

Valid layouts are built through the public API in every mode and mask encoding, read back through
``__tensor_flatten__``, then tampered with one change at a time; every tampered layout must be refused
with an error naming the parameter, and every untampered one accepted. The tampering positions and
values are drawn by Hypothesis, and a deterministic sweep covers every (layout, tampering) pair once.
"""

from __future__ import annotations

import functools
import io
import random

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import resu
from resu.core.selective import SelectionConfig
from resu.optim.selective import state_layout
from resu.tensors.mask_kernels import MaskEncoding, _storage_dtype, _storage_len
from resu.tensors.quantized import QuantFormat
from resu.tensors.resu_parameter import ResuParameter
from resu.compile.launch_checks import (
    check_launch_adamw_bitmap,
    check_launch_bitmap_key_adamw,
    check_launch_consistency_pass,
    check_launch_dequant_merge,
    check_launch_gather_bitmap,
    check_launch_indexed_adamw,
    check_launch_theta_adamw,
)
from resu.optim.state_checks import _selection_layout, check_optimizer_state
from resu.tensors.validate import CheckpointError, validate_layout

NAME = "fc.weight"
SHAPE = (7, 13)  # 91 slots: an odd count (a half-used last 4-bit byte) and 5 bitmap padding bits
NUMEL = SHAPE[0] * SHAPE[1]
# Pruned counts that make the library pick each encoding at 91 slots (see choose_encoding).
N_PRUNED = {"pruned_indices": 2, "bitmap": 46, "active_indices": 89}
QFORMATS = [(bits, scheme) for bits in (4, 8) for scheme in ("per_tensor", "per_channel", "per_group")]

CASES = ["dense"] + [
    f"{mode}-{enc}" for mode in ("sparse", "resu") for enc in N_PRUNED
] + [f"qresu{bits}-{scheme}-{enc}" for bits, scheme in QFORMATS for enc in N_PRUNED]


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resu.sparsify_(nn.Sequential(nn.Linear(SHAPE[1], SHAPE[0])))


@functools.lru_cache(maxsize=None)
def _built(case: str) -> ResuParameter:
    model = _linear_model()
    if case != "dense":
        mode, enc = case.rsplit("-", 1)
        resu.prune_(model, N_PRUNED[enc] / NUMEL, scope="global")
        if mode == "resu":
            resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(1))
        elif mode.startswith("qresu"):
            bits, scheme = mode[len("qresu"):].split("-")
            resu.enter_qresu_(model, bits=int(bits), scheme=scheme, group_size=4, epsilon=0.5,
                              generator=torch.Generator().manual_seed(1))
    return model[0].weight


def _layout(case: str) -> dict:
    """validate_layout's keyword arguments for a fresh copy of ``case``'s parameter."""
    p = _built(case)
    names, spec = p.__tensor_flatten__()
    mode, encoding, n_pruned, fmt = spec.mode, spec.encoding_name, spec.n_pruned, spec.qformat
    if case != "dense":
        assert encoding == case.rsplit("-", 1)[1]  # the case really has the intended encoding
    return dict(
        shape=tuple(p.shape), mode=mode, encoding=encoding, n_pruned=n_pruned, quant_format=fmt,
        tensors={k: getattr(p, k).clone() for k in names},
    )


def _refused(layout: dict) -> CheckpointError:
    """Assert ``layout`` is refused (for the field its ``"expect"`` entry names, when it has one)."""
    layout = dict(layout)
    expect = layout.pop("expect", None)
    with pytest.raises(CheckpointError) as info:
        validate_layout(NAME, **layout)
    assert NAME in str(info.value) and info.value.name == NAME
    if expect is not None:
        assert info.value.field.startswith(expect), (expect, str(info.value))
    return info.value


# ---------------------------------------------------------------------- untampered layouts


@pytest.mark.parametrize("case", CASES)
def test_every_valid_layout_is_accepted_and_left_unchanged(case):
    layout = _layout(case)
    before = {k: t.clone() for k, t in layout["tensors"].items()}
    validate_layout(NAME, **layout)
    for k, t in layout["tensors"].items():
        assert torch.equal(t, before[k]) and t.dtype == before[k].dtype, k


@pytest.mark.parametrize("case", ["sparse-bitmap", "resu-active_indices", "qresu4-per_group-pruned_indices"])
def test_layout_survives_a_weights_only_round_trip(case):
    buf = io.BytesIO()
    torch.save({"w": _built(case)}, buf)
    buf.seek(0)
    p = torch.load(buf, weights_only=True)["w"]
    names, spec = p.__tensor_flatten__()
    mode, encoding, n_pruned, fmt = spec.mode, spec.encoding_name, spec.n_pruned, spec.qformat
    validate_layout(NAME, shape=p.shape, mode=mode, encoding=encoding, n_pruned=n_pruned, quant_format=fmt,
                    tensors={k: getattr(p, k) for k in names})


@pytest.mark.parametrize("enc", ["pruned_indices", "active_indices", "bitmap"])
def test_every_encoding_is_accepted_not_only_the_chosen_one(enc):
    # The kernels compute correctly with any of the three encodings (see validate_layout's docstring).
    pruned = torch.zeros(NUMEL, dtype=torch.bool)
    pruned[torch.randperm(NUMEL, generator=torch.Generator().manual_seed(3))[:30]] = True
    storage = resu.tensors.mask._encode_as(pruned, enc)
    weight = torch.randn(SHAPE).masked_fill(pruned.view(SHAPE), 0)
    validate_layout(NAME, shape=SHAPE, mode="sparse", encoding=enc, n_pruned=30, quant_format=None,
                    tensors={"_weight": weight, "_mask_storage": storage})


def test_meta_tensors_are_checked_for_metadata_only():
    layout = _layout("sparse-bitmap")
    layout["tensors"] = {k: torch.empty_like(t, device="meta") for k, t in layout["tensors"].items()}
    validate_layout(NAME, **layout)
    layout["n_pruned"] += 1
    validate_layout(NAME, **layout)  # bitmap length does not depend on n_pruned; contents unknown on meta
    layout["tensors"]["_weight"] = torch.empty(3, device="meta")
    _refused(layout)


def test_sparse_values_relabelled_resu_are_accepted_but_resu_values_relabelled_sparse_are_not():
    sparse = _layout("sparse-bitmap")
    sparse["mode"] = "resu"  # a RESU weight whose θ is zero: a valid layout
    validate_layout(NAME, **sparse)
    resu_layout = _layout("resu-bitmap")
    resu_layout["mode"] = "sparse"
    err = _refused(resu_layout)
    assert err.field == "_weight" and "pruned slot" in str(err)


def test_one_dimensional_qresu_weight_is_refused():
    layout = _layout("qresu4-per_channel-bitmap")
    layout["shape"] = (NUMEL,)
    assert _refused(layout).field == "shape"


def test_error_message_names_parameter_field_expectation_and_finding():
    layout = _layout("resu-pruned_indices")
    layout["tensors"]["_mask_storage"][1] = NUMEL + 5
    msg = str(_refused(layout))
    assert msg.startswith(f"{NAME}: `_mask_storage (pruned_indices)` must be flat indices in [0, {NUMEL})")
    assert f"found values in [" in msg and str(NUMEL + 5) in msg and "re-save" in msg


# ---------------------------------------------------------------------- tampering


def _rebuild_format(fmt: QuantFormat, **fields) -> QuantFormat:
    """A QuantFormat with ``fields`` replaced, bypassing its own checks (as a crafted pickle could)."""
    out = object.__new__(QuantFormat)
    for key in ("bits", "scheme", "group_size"):
        object.__setattr__(out, key, fields.get(key, getattr(fmt, key)))
    return out


def _pick(layout: dict, rint, allowed=None) -> str:
    names = sorted(k for k in layout["tensors"] if allowed is None or k in allowed)
    return names[rint(0, len(names) - 1)] if names else None


def _with_tensor(layout: dict, key: str, t: torch.Tensor, expect: str = None) -> dict:
    return {**layout, "tensors": {**layout["tensors"], key: t}, "expect": key if expect is None else expect}


def _truncate(layout, rint):
    key = _pick(layout, rint)
    t = layout["tensors"][key]
    k = rint(1, t.numel())
    return _with_tensor(layout, key, t.reshape(-1)[: t.numel() - k].clone())


def _extend(layout, rint):
    key = _pick(layout, rint)
    t = layout["tensors"][key]
    extra = torch.zeros(rint(1, 9), dtype=t.dtype)
    return _with_tensor(layout, key, torch.cat([t.reshape(-1), extra]))


def _add_dim(layout, rint):
    key = _pick(layout, rint)
    return _with_tensor(layout, key, layout["tensors"][key].unsqueeze(rint(0, 1) if layout["tensors"][key].dim() else 0))


_WRONG_DTYPES = {
    torch.int32: [torch.int64, torch.int16, torch.float32],
    torch.uint8: [torch.int32, torch.int8, torch.float32, torch.bool],
    torch.float32: [torch.int32, torch.int64, torch.uint8],
}


def _wrong_dtype(layout, rint):
    key = _pick(layout, rint)
    t = layout["tensors"][key]
    choices = _WRONG_DTYPES[t.dtype]
    return _with_tensor(layout, key, t.to(choices[rint(0, len(choices) - 1)]))


def _strided(layout, rint):
    key = _pick(layout, rint)
    t = layout["tensors"][key]
    if t.numel() < 2:
        return None
    if t.dim() == 2:
        return _with_tensor(layout, key, t.t().contiguous().t())
    buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
    buf[::2] = t
    return _with_tensor(layout, key, buf[::2])


def _other_device(layout, rint):
    key = _pick(layout, rint)
    if len(layout["tensors"]) < 2:
        return None
    return _with_tensor(layout, key, layout["tensors"][key].to("meta"), expect="tensors")


def _drop_tensor(layout, rint):
    key = _pick(layout, rint)
    return {**layout, "tensors": {k: v for k, v in layout["tensors"].items() if k != key}, "expect": "tensors"}


def _extra_tensor(layout, rint):
    absent = [k for k in ("_weight", "_mask_storage", "_qdata", "_qscale", "_qzero", "_theta", "_bogus")
              if k not in layout["tensors"]]
    key = absent[rint(0, len(absent) - 1)]
    return _with_tensor(layout, key, torch.zeros(3), expect="tensors")


def _nested_subclass(layout, rint):
    if "_weight" not in layout["tensors"]:
        return None
    return _with_tensor(layout, "_weight", ResuParameter.from_weight(layout["tensors"]["_weight"]))


def _index_storage(layout):
    if layout["encoding"] in ("pruned_indices", "active_indices"):
        return layout["tensors"]["_mask_storage"].clone()
    return None


def _index_out_of_range(layout, rint):
    s = _index_storage(layout)
    if s is None:
        return None
    s[rint(0, s.numel() - 1)] = NUMEL + rint(0, 1000) if rint(0, 1) else -1 - rint(0, 1000)
    return _with_tensor(layout, "_mask_storage", s, expect=f"_mask_storage ({layout['encoding']})")


def _index_duplicate(layout, rint):
    s = _index_storage(layout)
    if s is None:
        return None
    i = rint(1, s.numel() - 1)
    s[i] = s[i - 1]
    return _with_tensor(layout, "_mask_storage", s, expect=f"_mask_storage ({layout['encoding']})")


def _index_unsorted(layout, rint):
    s = _index_storage(layout)
    if s is None:
        return None
    i = rint(0, s.numel() - 2)
    j = rint(i + 1, s.numel() - 1)
    s[[i, j]] = s[[j, i]]
    return _with_tensor(layout, "_mask_storage", s, expect=f"_mask_storage ({layout['encoding']})")


def _flip_bit(layout, rint, *, want_set: bool, padding: bool = False):
    if layout["encoding"] != "bitmap":
        return None
    s = layout["tensors"]["_mask_storage"].clone()
    bits = ((s.unsqueeze(1).to(torch.int32) >> torch.arange(8)) & 1).reshape(-1)
    if padding:
        candidates = list(range(NUMEL, bits.numel()))
    else:
        candidates = (bits[:NUMEL] == (0 if want_set else 1)).nonzero().reshape(-1).tolist()
    pos = candidates[rint(0, len(candidates) - 1)]
    s[pos // 8] ^= 1 << (pos % 8)
    return _with_tensor(layout, "_mask_storage", s, expect="_mask_storage (bitmap)")


def _bitmap_extra_bit(layout, rint):
    return _flip_bit(layout, rint, want_set=True)


def _bitmap_missing_bit(layout, rint):
    return _flip_bit(layout, rint, want_set=False)


def _bitmap_padding_bit(layout, rint):
    # One padding bit set and one real bit cleared: the popcount still equals n_pruned.
    padded = _flip_bit(layout, rint, want_set=True, padding=True)
    return None if padded is None else {**_flip_bit(padded, rint, want_set=False), "expect": "_mask_storage (bitmap)"}


def _sparse_pruned_nonzero(layout, rint):
    if layout["mode"] != "sparse":
        return None
    p = _built("sparse-" + layout["encoding"])
    pruned = (~p.active_mask).reshape(-1).nonzero().reshape(-1)
    w = layout["tensors"]["_weight"].clone()
    w.view(-1)[pruned[rint(0, pruned.numel() - 1)]] = [1e-30, -3.0, float("nan"), float("inf")][rint(0, 3)]
    return _with_tensor(layout, "_weight", w)


def _wrong_n_pruned(layout, rint):
    n = layout["n_pruned"]
    delta = rint(1, NUMEL + 5) * (1 if rint(0, 1) else -1)
    return {**layout, "n_pruned": n + delta}


def _n_pruned_not_int(layout, rint):
    n = layout["n_pruned"]
    return {**layout, "n_pruned": [float(n), bool(n), torch.tensor(n), str(n), None][rint(0, 4)], "expect": "n_pruned"}


def _bad_mode(layout, rint):
    return {**layout, "mode": ["frozen", "", 3, None, "SPARSE"][rint(0, 4)], "expect": "mode"}


def _switched_mode(layout, rint):
    # Only switches that change which inner tensors exist (SPARSE <-> RESU can be valid both ways).
    group = {"dense": 0, "sparse": 1, "resu": 1, "qresu": 2}
    others = [m for m in ("dense", "sparse", "resu", "qresu") if group[m] != group[layout["mode"]]]
    return {**layout, "mode": others[rint(0, len(others) - 1)], "expect": "tensors"}


def _bad_encoding(layout, rint):
    return {**layout, "encoding": ["csr", 0, "BITMAP", None][rint(0, 3)] if layout["mode"] != "dense" else "bitmap",
            "expect": "encoding"}


def _relabelled_encoding(layout, rint):
    if layout["mode"] == "dense":
        return None
    others = [e for e in N_PRUNED if e != layout["encoding"]]
    enc = MaskEncoding(others[rint(0, 1)])
    s = layout["tensors"]["_mask_storage"]
    if s.dtype == _storage_dtype(enc) and s.numel() == _storage_len(enc, NUMEL, layout["n_pruned"]):
        return None  # would be a different but well-formed mask
    return {**layout, "encoding": enc.value, "expect": "_mask_storage"}


def _bad_shape(layout, rint):
    choices = [(7, 14), (6, 13), (NUMEL + 1,), (7, -13), (7.0, 13), (True, 91), "7x13", (7, 13, 2)]
    return {**layout, "shape": choices[rint(0, len(choices) - 1)]}


def _bad_format(layout, rint):
    fmt = layout["quant_format"]
    if fmt is None:
        return {**layout, "quant_format": QuantFormat(4, "per_channel", 4)}
    choices = [
        None,
        (fmt.bits, fmt.scheme, fmt.group_size),
        _rebuild_format(fmt, bits=float(fmt.bits)),
        _rebuild_format(fmt, bits=12 - fmt.bits),  # 4 <-> 8: the codes no longer fit
        _rebuild_format(fmt, bits=5),
        _rebuild_format(fmt, bits=True),
        _rebuild_format(fmt, scheme=[s for s in ("per_tensor", "per_channel", "per_group") if s != fmt.scheme][rint(0, 1)]),
        _rebuild_format(fmt, scheme="per_row"),
        _rebuild_format(fmt, group_size=0),
        _rebuild_format(fmt, group_size=4.0),
    ]
    return {**layout, "quant_format": choices[rint(0, len(choices) - 1)]}


TAMPERS = {
    f.__name__.lstrip("_"): f
    for f in (
        _truncate, _extend, _add_dim, _wrong_dtype, _strided, _other_device, _drop_tensor, _extra_tensor,
        _nested_subclass, _index_out_of_range, _index_duplicate, _index_unsorted, _bitmap_extra_bit,
        _bitmap_missing_bit, _bitmap_padding_bit, _sparse_pruned_nonzero, _wrong_n_pruned, _n_pruned_not_int,
        _bad_mode, _switched_mode, _bad_encoding, _relabelled_encoding, _bad_shape, _bad_format,
    )
}


@given(case=st.sampled_from(CASES), tamper=st.sampled_from(sorted(TAMPERS)), data=st.data())
def test_fuzz_every_tampering_is_refused(case, tamper, data):
    layout = _layout(case)
    tampered = TAMPERS[tamper](layout, lambda lo, hi: data.draw(st.integers(lo, hi)))
    if tampered is None:
        return  # this tampering does not apply to this layout (a bitmap edit on an index mask, say)
    _refused(tampered)
    validate_layout(NAME, **layout)  # the original is still valid: nothing was changed in place


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_every_tampering_of_every_layout_is_refused(tamper):
    """The deterministic sweep: each tampering once on each layout it applies to."""
    applied = 0
    for i, case in enumerate(CASES):
        tampered = TAMPERS[tamper](_layout(case), random.Random(i).randint)
        if tampered is not None:
            _refused(tampered)
            applied += 1
    assert applied > 0


# ---------------------------------------------------------------------- optimizer state

_SELECTIVE = {
    "consistency": SelectionConfig(strategy="consistency", k_select_ratio=0.3),
    "random": SelectionConfig(strategy="random", k_select_ratio=0.3),
    "magnitude": SelectionConfig(strategy="magnitude", k_select_ratio=0.3),
}


def _trained(mode: str, selective=None, amsgrad=False, sparsity=0.5):
    model = _linear_model()
    if mode != "dense":
        resu.prune_(model, sparsity, scope="global")
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(1), selective=selective)
    if mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, epsilon=0.5,
                          generator=torch.Generator().manual_seed(1), selective=selective)
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, SHAPE[1], generator=g)).square().mean().backward()
        opt.step()
    return model[0].weight, opt


def _state_args(p, selective=None):
    """What ResuAdamW.load_state_dict would pass for parameter ``p``."""
    if p.mode.value == "dense":
        n_slots = tuple(p.shape)
    else:
        n_slots = p.n_pruned if p.mode.trains_theta else p.numel() - p.n_pruned
    positions = p._pruned_indices() if p.mode.value == "resu" else None
    return dict(n_slots=n_slots, dtype=p.dtype, device=p.device, selective=selective, theta_positions=positions)


STATE_SETUPS = [
    ("dense", None, False), ("sparse", None, False), ("sparse", None, True), ("resu", None, False),
    ("resu", None, True), ("qresu", None, False),
] + [(mode, strategy, False) for mode in ("resu", "qresu") for strategy in _SELECTIVE]


def _setup_id(setup):
    mode, strategy, amsgrad = setup
    return "-".join([mode] + ([strategy] if strategy else []) + (["amsgrad"] if amsgrad else []))


@functools.lru_cache(maxsize=None)
def _trained_state(setup):
    mode, strategy, amsgrad = setup
    selective = _SELECTIVE.get(strategy)
    p, opt = _trained(mode, selective, amsgrad)
    return p, opt.state[p], selective


def _state_copy(setup):
    p, state, selective = _trained_state(setup)
    return p, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}, selective


@pytest.mark.parametrize("setup", STATE_SETUPS, ids=_setup_id)
def test_valid_optimizer_states_are_accepted(setup):
    p, state, selective = _state_copy(setup)
    check_optimizer_state(NAME, state, **_state_args(p, selective))
    # as saved: before load_state_dict casts, with no dtype or device to match
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    check_optimizer_state(NAME, loaded, **{**_state_args(p, selective), "dtype": None, "device": None})


@pytest.mark.parametrize("n_slots", [0, 1, 7, 91])
@pytest.mark.parametrize("strategy", sorted(_SELECTIVE))
def test_selection_layout_mirrors_the_optimizer(n_slots, strategy):
    assert _selection_layout(_SELECTIVE[strategy], n_slots) == state_layout(_SELECTIVE[strategy], n_slots)


def _noncontiguous(t):
    buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
    buf[::2] = t.reshape(-1)
    return buf[::2].view(t.shape) if t.dim() == 1 else buf[::2]


STATE_TAMPERS = {
    "exp_avg_truncated": ("exp_avg", lambda s: s["exp_avg"].reshape(-1)[:-1].clone()),
    "exp_avg_extended": ("exp_avg", lambda s: torch.cat([s["exp_avg"].reshape(-1), torch.zeros(118)])),
    "exp_avg_sq_truncated": ("exp_avg_sq", lambda s: s["exp_avg_sq"].reshape(-1)[:-3].clone()),
    "exp_avg_sq_int": ("exp_avg_sq", lambda s: s["exp_avg_sq"].to(torch.int32)),
    "exp_avg_noncontiguous": ("exp_avg", lambda s: _noncontiguous(s["exp_avg"]) if s["exp_avg"].dim() == 1 else None),
    "exp_avg_not_tensor": ("exp_avg", lambda s: s["exp_avg"].tolist()),
    "exp_avg_missing": ("exp_avg", lambda s: "DROP"),
    "max_exp_avg_sq_truncated": ("max_exp_avg_sq", lambda s: s["max_exp_avg_sq"].reshape(-1)[:-1].clone()
                                 if "max_exp_avg_sq" in s else None),
    "step_negative": ("step", lambda s: torch.tensor(-1.0)),
    "step_nan": ("step", lambda s: torch.tensor(float("nan"))),
    "step_fractional": ("step", lambda s: torch.tensor(1.5)),
    "step_python_float": ("step", lambda s: 2.0),
    "step_vector": ("step", lambda s: torch.tensor([1.0, 2.0])),
    "step_missing": ("step", lambda s: "DROP"),
    "layout_id_float": ("layout_id", lambda s: 1.5),
    "selection_garbage": ("selection", lambda s: ("consistency", 3)),
    "selection_m_truncated": ("selection_m", lambda s: s["selection_m"][:-1].clone() if "selection_m" in s else None),
    "selection_v_int": ("selection_v", lambda s: s["selection_v"].to(torch.int64) if "selection_v" in s else None),
    "subset_out_of_range": ("subset", lambda s: _edit(s, "subset", -1, 10_000)),
    "subset_negative": ("subset", lambda s: _edit(s, "subset", 0, -1)),
    "subset_duplicate": ("subset", lambda s: _edit(s, "subset", 1, None)),
    "subset_unsorted": ("subset", lambda s: s["subset"].flip(0).contiguous() if "subset" in s else None),
    "subset_truncated": ("subset", lambda s: s["subset"][:-1].clone() if "subset" in s else None),
    "subset_float": ("subset", lambda s: s["subset"].float() if "subset" in s else None),
    "subset_positions_shifted": ("subset_positions", lambda s: s["subset_positions"] + 1 if "subset" in s else None),
    "subset_positions_out_of_range": ("subset_positions", lambda s: _edit(s, "subset_positions", -1, 10_000)),
    "subset_choices_negative": ("subset_choices", lambda s: torch.tensor(-1) if "subset_choices" in s else None),
    "subset_seed_float": ("subset_seed", lambda s: torch.tensor(3.5) if "subset_seed" in s else None),
}


def _edit(state, key, index, value):
    if key not in state:
        return None
    t = state[key].clone()
    t[index] = t[index - 1] if value is None else value
    return t


@pytest.mark.parametrize("tamper", sorted(STATE_TAMPERS))
def test_tampered_optimizer_states_are_refused(tamper):
    key, make = STATE_TAMPERS[tamper]
    applied = 0
    for setup in STATE_SETUPS:
        p, state, selective = _state_copy(setup)
        value = make(state)
        if value is None:
            continue
        if isinstance(value, str) and value == "DROP":
            del state[key]
        else:
            state[key] = value
        with pytest.raises(CheckpointError) as info:
            check_optimizer_state(NAME, state, **_state_args(p, selective))
        assert info.value.name == NAME and key in info.value.field, (setup, str(info.value))
        applied += 1
    assert applied > 0


@given(delta=st.integers(-40, 40).filter(bool), key=st.sampled_from(["exp_avg", "exp_avg_sq"]),
       setup=st.sampled_from(STATE_SETUPS))
def test_fuzz_moment_lengths(delta, key, setup):
    p, state, selective = _state_copy(setup)
    flat = state[key].reshape(-1)
    n = flat.numel() + delta
    state[key] = torch.cat([flat, torch.zeros(max(delta, 0))])[: max(n, 0)].clone()
    with pytest.raises(CheckpointError):
        check_optimizer_state(NAME, state, **_state_args(p, selective))


def test_state_of_another_selection_layout_is_left_to_the_optimizer_to_restart():
    # ResuAdamW restarts (resizes and zeroes) states whose selection tag differs from the weight's
    # config, so their lengths are not the current slots' and that is fine.
    p, state, _ = _state_copy(("resu", "random", False))
    check_optimizer_state(NAME, state, **_state_args(p, _SELECTIVE["consistency"]))
    state["exp_avg"] = torch.zeros(3)
    check_optimizer_state(NAME, state, **_state_args(p, _SELECTIVE["consistency"]))
    state["exp_avg"] = torch.zeros(3, dtype=torch.int32)  # but it must still be a floating tensor
    with pytest.raises(CheckpointError):
        check_optimizer_state(NAME, state, **_state_args(p, _SELECTIVE["consistency"]))


def test_empty_state_is_accepted():
    check_optimizer_state(NAME, {}, 10, torch.float32)


# ---------------------------------------------------------------------- kernel launches


def _bitmap_param():
    p = _built("resu-bitmap")
    return p._weight.clone(), p._mask_storage.clone(), p.n_pruned


def _meta(t):
    return t.to("meta")


def _launch_cases():
    """(launcher name, check function, valid kwargs) for every launcher kind."""
    w, storage, n = _bitmap_param()
    k = 5
    cases = [
        ("gather_bitmap", check_launch_gather_bitmap, dict(src=w, storage=storage, n_selected=n)),
        ("adamw_bitmap_", check_launch_adamw_bitmap,
         dict(weight=w, grad=torch.randn(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n), storage=storage,
              n_selected=n)),
        ("bitmap_key_adamw", check_launch_bitmap_key_adamw,
         dict(weight=w, grad=torch.randn(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n), storage=storage,
              keys=torch.arange(n), threshold=torch.tensor(3), n_pruned=n)),
        ("theta_adamw", check_launch_theta_adamw,
         dict(theta=torch.randn(n), grad=torch.randn(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n),
              select_mode=2, selector=torch.arange(n), threshold=torch.tensor(3))),
        ("indexed_adamw", check_launch_indexed_adamw,
         dict(param=w, param_index=torch.arange(k) * 2, grad=torch.randn(n), grad_index=torch.arange(k),
              exp_avg=torch.zeros(k), exp_avg_sq=torch.zeros(k))),
        ("consistency_pass", check_launch_consistency_pass,
         dict(grad=torch.randn(n), ema_m=torch.zeros(n), ema_v=torch.zeros(n), keys=torch.zeros(n, dtype=torch.int64),
              screen_threshold=torch.tensor(0))),
    ]
    for case in ("qresu4-per_group-bitmap", "qresu8-per_channel-pruned_indices", "qresu4-per_tensor-active_indices"):
        p = _built(case)
        cases.append((f"dequant_merge[{case}]", check_launch_dequant_merge,
                      dict(zip(("qdata", "scale", "zero", "theta", "storage", "encoding", "n_pruned", "rows", "cols",
                                "bits", "group_cols", "row_stride"), p._quant_op_args()))))
    return cases


LAUNCH_CASES = {name: (fn, kw) for name, fn, kw in _launch_cases()}


@pytest.mark.parametrize("launcher", sorted(LAUNCH_CASES))
def test_launch_checks_accept_what_the_library_passes(launcher):
    fn, kwargs = LAUNCH_CASES[launcher]
    fn(**kwargs)


def _launch_tampers(kwargs):
    """One-argument changes of lengths, dtypes, contiguity, devices and counts."""
    for arg, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            if v.numel():
                yield f"{arg} one short", {**kwargs, arg: v.reshape(-1)[:-1].clone()}
            yield f"{arg} one long", {**kwargs, arg: torch.cat([v.reshape(-1), v.reshape(-1)[:1]])}
            if arg != "src":  # gather_bitmap takes any source dtype
                yield f"{arg} dtype", {**kwargs, arg: v.to(torch.int32 if v.is_floating_point() else torch.float64)}
            if v.numel() > 1:
                yield f"{arg} strided", {**kwargs, arg: _noncontiguous(v)}
            yield f"{arg} on meta", {**kwargs, arg: _meta(v)}
        elif arg in ("n_selected", "n_pruned"):
            yield f"{arg} + 1", {**kwargs, arg: v + 1}
            yield f"{arg} as float", {**kwargs, arg: float(v)}
            yield f"{arg} negative", {**kwargs, arg: -1}
        elif arg == "bits":
            yield "bits as float", {**kwargs, arg: float(v)}
            yield "bits 4<->8", {**kwargs, arg: 12 - v}
        elif arg in ("rows", "cols"):
            yield f"{arg} + 1", {**kwargs, arg: v + 1}
        elif arg == "row_stride" and v:
            yield "row_stride - 1", {**kwargs, arg: v - 1}
        elif arg == "group_cols":
            yield "group_cols 0", {**kwargs, arg: 0}
        elif arg == "encoding":
            yield "encoding unknown", {**kwargs, arg: "csr"}
        elif arg == "select_mode":
            yield "select_mode 7", {**kwargs, arg: 7}


# Changes a host-side check cannot see, and that stay inside every buffer: the launcher takes the
# slot count from the weight itself (a bitmap of 12 bytes covers 89 to 96 slots), a gather output one
# longer than the popcount is never written past, and indexed AdamW indexes into larger buffers.
UNDETECTABLE = {
    "gather_bitmap": {"src one short", "src one long", "n_selected + 1"},
    "adamw_bitmap_": {"weight one short", "weight one long"},
    "bitmap_key_adamw": {"weight one short", "weight one long"},
    "indexed_adamw": {"param one short", "param one long", "grad one short", "grad one long"},
}


@pytest.mark.parametrize("launcher", sorted(LAUNCH_CASES))
def test_launch_checks_refuse_every_mismatch(launcher):
    fn, kwargs = LAUNCH_CASES[launcher]
    kind = launcher.split("[")[0]
    refused = 0
    for what, bad in _launch_tampers(kwargs):
        if what in UNDETECTABLE.get(kind, ()):
            continue
        with pytest.raises(ValueError, match=kind) as info:
            fn(**bad)
        assert not isinstance(info.value, CheckpointError), what
        refused += 1
    assert refused >= 5


def _dequant_merge_scalar_tampers(kwargs):
    """Scalar changes aimed at the fast path's cache key: values equal to valid ones but of another type
    (a float or bool hashes like the int it equals), other decodes, an encoding given as its enum."""
    for arg in ("rows", "cols", "bits", "group_cols", "row_stride", "n_pruned"):
        yield f"{arg} as float", {**kwargs, arg: float(kwargs[arg])}
        if kwargs[arg] in (0, 1):
            yield f"{arg} as bool", {**kwargs, arg: bool(kwargs[arg])}
    for decode in ("nf4", "nf4_dq", "bogus", None, ["affine"]):
        yield f"decode {decode!r}", {**kwargs, "decode": decode}
    yield "encoding unhashable", {**kwargs, "encoding": [kwargs["encoding"]]}
    yield "encoding as enum", {**kwargs, "encoding": MaskEncoding(kwargs["encoding"])}


@pytest.mark.parametrize("launcher", sorted(k for k in LAUNCH_CASES if k.startswith("dequant_merge")))
def test_dequant_merge_fast_check_accepts_only_what_the_full_check_accepts(launcher):
    """check_launch_dequant_merge answers most calls from expectations cached per shape and format; with
    that cache warm from a valid call, every tampered call must still get the full check's own verdict
    (the same error, or acceptance where the full check accepts)."""
    from resu.compile import launch_checks

    fn, kwargs = LAUNCH_CASES[launcher]
    assert launch_checks._dequant_merge_accepts(**{"decode": "affine", **kwargs})  # the common case is fast
    compared = 0
    for what, bad in [*_launch_tampers(kwargs), *_dequant_merge_scalar_tampers(kwargs)]:
        fn(**kwargs)  # warm
        try:
            launch_checks._check_dequant_merge_in_full(**bad)
        except ValueError as full:
            with pytest.raises(ValueError) as got:
                fn(**bad)
            assert str(got.value) == str(full), what
        else:
            fn(**bad)  # accepted by both
        compared += 1
    assert compared >= 20


def test_launch_checks_never_read_device_data():
    # Meta tensors have no data: a check that read values would fail on them.
    for launcher, (fn, kwargs) in LAUNCH_CASES.items():
        fn(**{k: _meta(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


# The kernels themselves: compiled on a GPU, under the Triton interpreter on CPU (set by conftest).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_kernel_device(args):
    return tuple(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", ["qresu4-per_group-bitmap", "qresu8-per_channel-pruned_indices",
                                  "qresu4-per_tensor-active_indices"])
def test_dequant_merge_kernel_runs_on_what_its_check_accepts(case):
    triton_qresu = pytest.importorskip("resu.compile.triton_qresu")
    from resu.compile.qlinear import dequant_merge_reference

    args = _on_kernel_device(_built(case)._quant_op_args())
    check_launch_dequant_merge(*args)
    got = triton_qresu.dequant_merge_triton(*args, torch.float32)
    assert torch.equal(got.cpu(), dequant_merge_reference(*_built(case)._quant_op_args(), torch.float32))


def test_bitmap_kernels_run_on_what_their_checks_accept():
    triton_bitmap = pytest.importorskip("resu.compile.triton_bitmap")
    from resu.compile.linear import gather_masked_reference
    from resu.compile.triton_adamw import bitmap_adamw_triton_

    w, storage, n = _on_kernel_device(_bitmap_param())
    check_launch_gather_bitmap(w, storage, n)
    got = triton_bitmap.gather_bitmap(w, storage, n, True, torch.float32)
    assert torch.equal(got, gather_masked_reference(w, storage, "bitmap", n, True, torch.float32))
    grad, m, v = _on_kernel_device((torch.randn(n), torch.zeros(n), torch.zeros(n)))
    check_launch_adamw_bitmap(w, grad, m, v, storage, n)
    before = w.clone()
    bitmap_adamw_triton_(w, grad, m, v, storage, True, 1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                         weight_decay=0.0, maximize=False, n_selected=n)
    pruned = ~_built("resu-bitmap").active_mask.to(KERNEL_DEVICE)
    assert torch.equal(w[~pruned], before[~pruned]) and not torch.equal(w[pruned], before[pruned])
    assert torch.allclose(m, 0.1 * grad, rtol=1e-6, atol=0)


def test_dequant_merge_check_refuses_a_row_stride_too_small_for_the_groups():
    # Scales shortened to match the smaller stride: only the stride-vs-groups check sees it (the last
    # group of a row would index the next row's first scale, and the last row's past the end).
    fn, kwargs = LAUNCH_CASES["dequant_merge[qresu4-per_group-bitmap]"]
    stride = kwargs["row_stride"] - 1
    n = kwargs["rows"] * stride
    bad = {**kwargs, "row_stride": stride, "scale": kwargs["scale"].reshape(-1)[:n].clone(),
           "zero": kwargs["zero"].reshape(-1)[:n].clone()}
    with pytest.raises(ValueError, match="row_stride"):
        fn(**bad)
