"""resu.save_pretrained / resu.load_pretrained_: a sparsified Hugging Face model (tiny Llama, Qwen2 and
GPT-2 built from configs) exports ordinary dense weights that plain transformers loads with the same
outputs, and its modes, masks and QRESU codes come back exactly."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import resu
from resu.io import LAYOUT_FILE, attach_hf_checkpointing, load_pretrained_, save_pretrained
from tests.helpers import assert_same_state, exact_state

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _config(arch):
    common = dict(vocab_size=VOCAB, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **common)
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)


def _model(arch, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(arch)).to(dtype).eval()


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _in_mode(model, mode):
    resu.sparsify_(model)
    if mode == "dense":
        return model
    resu.prune_(model, 0.5, method="wanda", calib=[{"input_ids": _ids(1)}])
    if mode == "resu":
        resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    elif mode == "qresu4":
        resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=16, epsilon=0.5,
                          generator=torch.Generator().manual_seed(0))
    elif mode == "qresu8":
        resu.enter_qresu_(model, bits=8, scheme="per_channel", epsilon=0.5, generator=torch.Generator().manual_seed(0))
    return model


def _file_tensors(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    files = set(json.load(open(index))["weight_map"].values()) if os.path.exists(index) else {"model.safetensors"}
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "qresu4", "qresu8"])
def test_export_loads_in_plain_transformers_and_restores_exactly(tmp_path, arch, mode):
    model = _in_mode(_model(arch), mode)
    ids = _ids()
    ref = _logits(model, ids)
    save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", LAYOUT_FILE} <= set(os.listdir(tmp_path))

    # ordinary dense tensors: the effective weights, exact zeros at the pruned slots in SPARSE mode
    written = _file_tensors(tmp_path)
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            assert type(written[name]) is torch.Tensor and torch.equal(written[name], p.effective_weight()), name
            if mode == "sparse":
                assert torch.all(written[name][~p.active_mask] == 0), name

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(p, resu.ResuParameter) for p in plain.parameters())
    assert torch.equal(_logits(plain, ids), ref)  # same weights, same ops: bitwise

    resu.sparsify_(plain)
    result = load_pretrained_(plain, tmp_path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_state(exact_state(model), exact_state(plain), same_objects=False)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if isinstance(p, resu.ResuParameter):
            assert p.resu_layout.to_dict() == q.resu_layout.to_dict(), n
    assert torch.equal(_logits(plain, ids), ref)


def test_gpt2_conv1d_weights_stay_plain_and_the_head_is_sparsified():
    """GPT-2's attention and MLP use transformers' Conv1D, not nn.Linear: sparsify_ leaves them alone."""
    model = resu.sparsify_(_model("gpt2"))
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and not isinstance(conv.weight, resu.ResuParameter)
    assert isinstance(model.lm_head.weight, resu.ResuParameter)


def test_sharded_export_restores_from_every_shard(tmp_path):
    model = _in_mode(_model("llama", dtype=torch.bfloat16), "resu")
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    plain = resu.sparsify_(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval())
    load_pretrained_(plain, tmp_path)
    assert_same_state(exact_state(model), exact_state(plain), same_objects=False)


def test_load_pretrained_into_a_freshly_built_model_takes_the_saved_weights(tmp_path):
    """The dense weights come from the directory, not from whatever the target held."""
    model = _in_mode(_model("qwen2"), "sparse")
    save_pretrained(model, tmp_path)
    other = resu.sparsify_(_model("qwen2", seed=5))
    load_pretrained_(other, tmp_path)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        if isinstance(p, resu.ResuParameter):
            assert torch.equal(p.effective_weight(), q.effective_weight()), n


def test_plain_save_pretrained_works_after_sparsify(tmp_path):
    """``sparsify_`` makes a Hugging Face model's own ``save_pretrained`` (what Trainer calls) write the
    dense export and the layout file; ``attach_hf_checkpointing`` does the same for a model whose method
    was replaced since."""
    model = _in_mode(_model("llama"), "qresu4")
    model.save_pretrained(tmp_path / "plain")
    save_pretrained(model, tmp_path / "explicit")
    a, b = _file_tensors(tmp_path / "plain"), _file_tensors(tmp_path / "explicit")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    restored = resu.sparsify_(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))
    load_pretrained_(restored, tmp_path / "plain")
    assert_same_state(exact_state(model), exact_state(restored), same_objects=False)


def test_hugging_face_save_of_a_model_not_passed_to_sparsify_fails_early(tmp_path):
    model = _in_mode(_model("llama"), "qresu4")
    del model.save_pretrained  # the class's own method again, as for a model sparsified another way
    before = exact_state(model)
    with pytest.raises(ValueError, match="resu.save_pretrained"):
        model.save_pretrained(tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / "model.safetensors")
    assert_same_state(before, exact_state(model))
    attach_hf_checkpointing(model)
    model.save_pretrained(tmp_path / "attached")
    assert os.path.exists(tmp_path / "attached" / LAYOUT_FILE)


def test_attached_save_pretrained_survives_deepcopy(tmp_path):
    import copy

    model = attach_hf_checkpointing(_in_mode(_model("llama"), "sparse"))
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.model is twin
    twin.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / LAYOUT_FILE)


def test_load_pretrained_refuses_a_mismatch_and_changes_nothing(tmp_path):
    model = _in_mode(_model("llama"), "resu")
    save_pretrained(model, tmp_path)
    target = _in_mode(_model("gpt2", seed=3), "sparse")  # other architecture: other parameter names
    before = exact_state(target)
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained_(target, tmp_path)
    assert_same_state(before, exact_state(target))

    wider = resu.sparsify_(transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**_config("llama").to_dict(), "intermediate_size": 96})))
    before = exact_state(wider)
    with pytest.raises(ValueError, match="shape"):
        load_pretrained_(wider, tmp_path)
    assert_same_state(before, exact_state(wider))

    os.remove(tmp_path / LAYOUT_FILE)
    with pytest.raises(ValueError, match=LAYOUT_FILE):
        load_pretrained_(target, tmp_path)


def test_save_pretrained_needs_a_hugging_face_model(tmp_path):
    with pytest.raises(TypeError, match="save_safetensors"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_readme_hugging_face_runs(tmp_path, monkeypatch):
    from tests.test_safetensors import readme_block

    monkeypatch.chdir(tmp_path)
    model = _in_mode(_model("llama"), "qresu4")
    code = readme_block("Hugging Face").replace("import resu\n", "")
    namespace = {"model": model, "resu": resu}
    exec(code, namespace)
    ids = _ids()
    assert torch.equal(_logits(namespace["served"], ids), _logits(model, ids))
    assert_same_state(exact_state(model), exact_state(namespace["restored"]), same_objects=False)


def test_layout_file_never_loads_plain_weights(tmp_path):
    """The layout file describes ResuParameters only: a plain key in it is unexpected and never loaded."""
    from safetensors.torch import save_file

    model = _in_mode(_model("llama"), "sparse")
    save_pretrained(model, tmp_path)
    with safe_open(tmp_path / LAYOUT_FILE, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.norm.weight"] = torch.full((64,), 7.0)
    save_file(tensors, tmp_path / LAYOUT_FILE, metadata=metadata)
    target = resu.sparsify_(transformers.AutoModelForCausalLM.from_pretrained(tmp_path))
    before = exact_state(target)
    with pytest.raises(ValueError, match="unexpected keys \\['model.norm.weight'\\]"):
        load_pretrained_(target, tmp_path)
    assert_same_state(before, exact_state(target))
    result = load_pretrained_(target, tmp_path, strict=False)
    assert result.unexpected_keys == ["model.norm.weight"]
    assert torch.equal(target.model.norm.weight, model.model.norm.weight)
    assert_same_state(exact_state(model), exact_state(target), same_objects=False)
