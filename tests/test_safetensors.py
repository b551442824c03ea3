"""resu.save_safetensors / resu.load_safetensors_: every mode round-trips exactly, optimizer states
continue bitwise, and a corrupt or mismatched file raises a ValueError and changes nothing."""

import io
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file, save_model

import resu
from resu.io import load_safetensors_, save_safetensors
from tests.helpers import assert_same_state, exact_state, mlp, model_in_mode


class WithBuffer(nn.Module):
    """An MLP with a plain buffer and a plain (not sparsified) parameter besides its Linear weights."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 5)
        self.norm = nn.LayerNorm(20)
        self.register_buffer("shift", torch.randn(12))

    def forward(self, x):
        return self.fc2(self.norm(torch.relu(self.fc1(x + self.shift))))


def _layouts(model):
    return {n: p.resu_layout for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}


def _assert_restored(saved, loaded, x):
    assert torch.equal(loaded(x), saved(x))
    a, b = _layouts(saved), _layouts(loaded)
    assert a.keys() == b.keys()
    for name in a:
        # every spec field, the ones left out of equality included
        assert a[name].to_dict() == b[name].to_dict(), name
    assert_same_state(exact_state(saved), exact_state(loaded), same_objects=False)
    for (ka, va), (kb, vb) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb
        if not isinstance(va, resu.ResuParameter):
            assert torch.equal(va, vb), ka


def _roundtrip(model, tmp_path, fresh=None, **kw):
    path = tmp_path / "model.safetensors"
    save_safetensors(model, path)
    fresh = fresh if fresh is not None else resu.sparsify_(mlp(seed=99, **kw))
    result = load_safetensors_(fresh, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return fresh


@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "qresu"])
@pytest.mark.parametrize("sparsity", [0.02, 0.5, 0.99])  # the three mask encodings
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_mode_round_trips_exactly(tmp_path, mode, sparsity, dtype):
    model = model_in_mode(mode, sparsity=sparsity, dtype=dtype)
    fresh = _roundtrip(model, tmp_path, dtype=dtype)
    _assert_restored(model, fresh, torch.randn(9, 12, dtype=dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel", "per_group"])
def test_qresu_round_trips_codes_scales_and_theta(tmp_path, bits, scheme):
    model = resu.sparsify_(mlp(seed=3))
    resu.prune_(model, 0.6)
    resu.enter_qresu_(model, bits=bits, scheme=scheme, group_size=5, epsilon=0.5,
                      generator=torch.Generator().manual_seed(1))
    fresh = _roundtrip(model, tmp_path)
    _assert_restored(model, fresh, torch.randn(6, 12))
    for p, q in zip(model.parameters(), fresh.parameters()):
        if isinstance(p, resu.ResuParameter):
            for attr in ("_qdata", "_qscale", "_qzero", "_theta", "_mask_storage"):
                assert torch.equal(getattr(p, attr), getattr(q, attr)), attr


@pytest.mark.parametrize("qresu", [False, True])
def test_selective_config_travels_in_the_layout(tmp_path, qresu):
    model = resu.sparsify_(mlp())
    resu.prune_(model, 0.5)
    config = resu.SelectionConfig(k_select_ratio=0.3, strategy="random", refresh_every=2)
    if qresu:
        resu.enter_qresu_(model, bits=8, selective=config, generator=torch.Generator().manual_seed(0))
    else:
        resu.enter_resu_(model, selective=config, generator=torch.Generator().manual_seed(0))
    fresh = _roundtrip(model, tmp_path)
    for p in fresh.parameters():
        if isinstance(p, resu.ResuParameter):
            assert p.resu_layout.selective == config
    _assert_restored(model, fresh, torch.randn(4, 12))


def test_plain_parameters_and_buffers_are_restored(tmp_path):
    model = resu.sparsify_(WithBuffer(seed=0))
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.norm.weight.uniform_()
    fresh = _roundtrip(model, tmp_path, fresh=resu.sparsify_(WithBuffer(seed=7)))
    assert torch.equal(fresh.shift, model.shift) and torch.equal(fresh.norm.weight, model.norm.weight)
    _assert_restored(model, fresh, torch.randn(5, 12))


def test_loads_over_any_current_mode(tmp_path):
    """The target's own mode and mask do not matter: a QRESU model takes a SPARSE file, and back."""
    sparse, qresu = model_in_mode("sparse", sparsity=0.3, seed=1), model_in_mode("qresu", sparsity=0.7, seed=2)
    x = torch.randn(4, 12)
    for source, target in ((sparse, model_in_mode("qresu", seed=5)), (qresu, model_in_mode("resu", seed=6))):
        _assert_restored(source, _roundtrip(source, tmp_path, fresh=target), x)


@pytest.mark.parametrize("mode", ["resu", "qresu", "selective"])
def test_resu_adamw_continues_bitwise_after_reload(tmp_path, mode):
    def build(seed):
        model = resu.sparsify_(mlp(seed=seed))
        return model

    model = build(0)
    resu.prune_(model, 0.5)
    if mode == "qresu":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=4, generator=torch.Generator().manual_seed(0))
    else:
        selective = resu.SelectionConfig(k_select_ratio=0.5) if mode == "selective" else None
        resu.enter_resu_(model, epsilon=0.5, selective=selective, generator=torch.Generator().manual_seed(0))
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]

    def train(m, o, bs):
        for x, y in bs:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    train(model, opt, batches[:2])
    save_safetensors(model, tmp_path / "model.safetensors")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)

    fresh = build(42)
    load_safetensors_(fresh, tmp_path / "model.safetensors")
    fresh_opt = resu.ResuAdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(torch.load(buf, weights_only=True))

    train(model, opt, batches[2:])
    train(fresh, fresh_opt, batches[2:])
    assert_same_state(exact_state(model), exact_state(fresh), same_objects=False)
    for s, t in zip(opt.state.values(), fresh_opt.state.values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])


class Shared(nn.Module):
    """Two Linear layers sharing one weight, and two buffers that are one tensor."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        table = torch.randn(8)
        self.register_buffer("u", table)
        self.register_buffer("v", table)

    def forward(self, x):
        return self.b(self.a(x + self.u)) + self.v


def test_shared_tensors_are_written_once_and_stay_shared(tmp_path):
    model = resu.sparsify_(Shared())
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "model.safetensors"
    save_safetensors(model, path, metadata={"note": "shared"})
    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["resu"])
        keys = set(f.keys())
        assert f.metadata()["note"] == "shared"
    assert header["tied"] == {"b.weight": "a.weight", "v": "u"}
    assert "b.weight.weight" not in keys and "v" not in keys
    fresh = resu.sparsify_(Shared(seed=3))
    load_safetensors_(fresh, path)
    assert fresh.a.weight is fresh.b.weight
    assert torch.equal(fresh.v, model.v)
    _assert_restored(model, fresh, torch.randn(3, 8))


def test_metadata_may_not_take_resus_key(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors(model_in_mode("dense"), tmp_path / "m.safetensors", metadata={"resu": "{}"})


# ---------------------------------------------------------------------- corrupt and mismatched files
def _read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["resu"])


def _write(path, tensors, header, raw_header=None):
    save_file(tensors, path, metadata={"resu": raw_header if raw_header is not None else json.dumps(header)})


def _tamper(tensors, header, what):
    entry = header["params"]["0.weight"]
    if what == "wrong_shape":
        tensors["2.bias"] = torch.zeros(6)
    elif what == "wrong_param_shape":
        entry["shape"] = [20, 13]
    elif what == "missing_key":
        del tensors["0.bias"]
    elif what == "missing_inner":
        del tensors["0.weight.mask_storage"]
    elif what == "unexpected_key":
        tensors["extra"] = torch.zeros(1)
    elif what == "mask_count":
        entry["layout"]["n_pruned"] += 1
    elif what == "mask_bits":
        storage = tensors["0.weight.mask_storage"].clone()
        storage[0] ^= 1  # one bit flipped: the popcount disagrees with n_pruned
        tensors["0.weight.mask_storage"] = storage
    elif what == "truncated_theta":
        tensors["0.weight.theta"] = tensors["0.weight.theta"][:-1].clone()
    elif what == "theta_dtype":
        tensors["0.weight.theta"] = tensors["0.weight.theta"].double()
    elif what == "codes_short":
        tensors["0.weight.qdata"] = tensors["0.weight.qdata"][:-1].clone()
    elif what == "scale_shape":
        tensors["0.weight.qscale"] = tensors["0.weight.qscale"][:-1].clone()
    elif what == "unknown_mode":
        entry["layout"]["mode"] = "half-dense"
    elif what == "unknown_encoding":
        entry["layout"]["encoding"] = "rle"
    elif what == "unknown_layout_field":
        entry["layout"]["colour"] = "blue"
    elif what == "unknown_entry_field":
        entry["note"] = 1
    elif what == "bad_qformat":
        entry["layout"]["qformat"]["bits"] = 3
    elif what == "unknown_version":
        header["version"] = 99
    elif what == "not_resu":
        header["format"] = "other"
    elif what == "dtype":
        entry["dtype"] = "float16"
    elif what == "stray_inner":
        tensors["0.weight.theta"] = torch.zeros(3)
    elif what == "tied_to_nothing":
        header["tied"] = {"2.bias": "nowhere"}
    else:
        raise AssertionError(what)


CASES = {
    "wrong_shape": ("dense", "2.bias"),
    "wrong_param_shape": ("dense", "shape"),
    "missing_key": ("dense", "missing keys \\['0.bias'\\]"),
    "missing_inner": ("sparse", "mask_storage"),
    "unexpected_key": ("dense", "unexpected keys \\['extra'\\]"),
    "mask_count": ("sparse", "mask_storage"),
    "mask_bits": ("sparse", "mask_storage"),
    "truncated_theta": ("qresu", "theta"),
    "theta_dtype": ("qresu", "theta"),
    "codes_short": ("qresu", "qdata"),
    "scale_shape": ("qresu", "qscale"),
    "unknown_mode": ("sparse", "layout"),
    "unknown_encoding": ("sparse", "layout"),
    "unknown_layout_field": ("resu", "colour"),
    "unknown_entry_field": ("resu", "note"),
    "bad_qformat": ("qresu", "layout"),
    "unknown_version": ("dense", "version"),
    "not_resu": ("dense", "format"),
    "dtype": ("dense", "dtype"),
    "stray_inner": ("sparse", "theta"),
    "tied_to_nothing": ("dense", "tied"),
}


@pytest.mark.parametrize("what", sorted(CASES))
def test_corrupt_file_raises_and_changes_nothing(tmp_path, what):
    mode, message = CASES[what]
    path = tmp_path / "model.safetensors"
    save_safetensors(model_in_mode(mode, sparsity=0.5, seed=0), path)
    tensors, header = _read(path)
    _tamper(tensors, header, what)
    _write(path, tensors, header)
    target = model_in_mode("resu", sparsity=0.3, seed=4)
    opt = resu.ResuAdamW(target.parameters(), lr=0.1)
    nn.functional.cross_entropy(target(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()  # the target has gradients and optimizer states: all must survive the failed load
    before = exact_state(target)
    with pytest.raises(ValueError, match=message):
        load_safetensors_(target, path)
    assert_same_state(before, exact_state(target))


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", "null"])
def test_garbage_json_header_raises(tmp_path, raw):
    path = tmp_path / "model.safetensors"
    _write(path, {"x": torch.zeros(1)}, None, raw_header=raw)
    target = model_in_mode("sparse")
    before = exact_state(target)
    with pytest.raises(ValueError, match="resu"):
        load_safetensors_(target, path)
    assert_same_state(before, exact_state(target))


def test_not_a_safetensors_file_or_a_truncated_one_raises(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors(model_in_mode("resu"), good)
    target = model_in_mode("sparse")
    before = exact_state(target)
    for name, data in (("garbage", b"\x00\x01 not a tensor file"), ("truncated", good.read_bytes()[:-40])):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="safetensors"):
            load_safetensors_(target, bad)
    save_file({"0.weight": torch.zeros(20, 12)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="resu.save_safetensors"):
        load_safetensors_(target, tmp_path / "plain.safetensors")
    assert_same_state(before, exact_state(target))


def test_sparse_weight_must_be_zero_at_pruned_slots(tmp_path):
    path = tmp_path / "model.safetensors"
    model = model_in_mode("sparse")
    save_safetensors(model, path)
    tensors, header = _read(path)
    pruned = ~model[0].weight.active_mask
    w = tensors["0.weight.weight"].clone()
    w[pruned.nonzero()[0].tolist()] = 1.0
    tensors["0.weight.weight"] = w
    _write(path, tensors, header)
    with pytest.raises(ValueError, match="0.weight.*zero"):
        load_safetensors_(resu.sparsify_(mlp()), path)


def test_a_plain_model_or_a_plain_file_entry_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(model_in_mode("sparse"), path)
    with pytest.raises(ValueError, match="sparsify_"):
        load_safetensors_(mlp(), path)  # the model was not sparsified
    save_safetensors(mlp(), path)  # a file without ResuParameters
    with pytest.raises(ValueError, match="0.weight"):
        load_safetensors_(resu.sparsify_(mlp()), path)


def test_non_strict_loads_what_matches_and_reports_the_rest(tmp_path):
    path = tmp_path / "model.safetensors"
    model = model_in_mode("resu")
    save_safetensors(model, path)
    tensors, header = _read(path)
    del tensors["2.bias"]
    tensors["extra"] = torch.ones(2)
    _write(path, tensors, header)
    fresh = resu.sparsify_(mlp(seed=9))
    bias = fresh[2].bias.detach().clone()
    result = load_safetensors_(fresh, path, strict=False)
    assert result.missing_keys == ["2.bias"] and result.unexpected_keys == ["extra"]
    assert torch.equal(fresh[2].bias, bias)
    assert fresh[0].weight.mode is resu.ResuMode.RESU
    assert torch.equal(fresh[0].weight.effective_weight(), model[0].weight.effective_weight())


def test_a_failure_while_writing_puts_everything_back(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_safetensors(model_in_mode("qresu", seed=1), path)
    target = model_in_mode("resu", seed=3)
    before = exact_state(target)
    import resu.io.load_plan as load_plan

    real, calls = load_plan._install, []

    def failing(p, entry):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        real(p, entry)

    monkeypatch.setattr(load_plan, "_install", failing)
    with pytest.raises(RuntimeError, match="injected"):
        load_safetensors_(target, path)
    assert len(calls) == 2
    assert_same_state(before, exact_state(target))


# ---------------------------------------------------------------------- safetensors' own entry points
@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "qresu"])
def test_safetensors_own_savers_fail_early_with_a_clear_error(tmp_path, mode):
    model = model_in_mode(mode)
    before = exact_state(model)
    with pytest.raises(ValueError, match="resu.save_safetensors"):
        save_model(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError):
        save_file(model.state_dict(), tmp_path / "b.safetensors")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    assert_same_state(before, exact_state(model))
    # torch.save round trips are untouched
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = resu.sparsify_(mlp(seed=5))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------------- the README's code
def readme_block(heading, index=0):
    """Python block number ``index`` of README section ``heading``."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


def test_readme_saving_and_loading_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = model_in_mode("resu")
    opt = resu.ResuAdamW(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    scope = {"model": model, "opt": opt, "build_model": lambda: mlp(seed=7)}
    code = readme_block("Saving and loading").replace("import torch, resu\n", "import torch\n")
    namespace = {**scope, "resu": resu}
    exec(code, namespace)
    x = torch.randn(3, 12)
    assert torch.equal(namespace["fresh"](x), model(x))
    assert namespace["fresh_opt"].state_dict()["state"].keys() == opt.state_dict()["state"].keys()


# ---------------------------------------------------------------------- devices
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_loads_to_the_models_device(tmp_path, mode):
    """A file saved from a CUDA model loads into a CPU model and back; tensors follow the model."""
    path = tmp_path / "model.safetensors"
    gpu = model_in_mode(mode).cuda()
    save_safetensors(gpu, path)
    cpu = resu.sparsify_(mlp(seed=3))
    load_safetensors_(cpu, path)
    x = torch.randn(4, 12)
    assert all(t.device.type == "cpu" for p in cpu.parameters() for t in
               ([getattr(p, a) for a in p.__tensor_flatten__()[0]] if isinstance(p, resu.ResuParameter) else [p]))
    save_safetensors(cpu, path)
    again = resu.sparsify_(mlp(seed=4)).cuda()
    load_safetensors_(again, path)
    assert all(p.device.type == "cuda" for p in again.parameters())
    for p in again.parameters():
        if isinstance(p, resu.ResuParameter):
            assert all(getattr(p, a).device.type == "cuda" for a in p.__tensor_flatten__()[0])
    torch.testing.assert_close(again(x.cuda()).cpu(), cpu(x))
    assert_same_state(exact_state(cpu), exact_state(again.cpu()), same_objects=False)


def test_a_meta_model_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(ValueError, match="meta"):
        save_safetensors(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
