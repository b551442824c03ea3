"""resu.load_quantized_: a model built on the meta device, filled from a checkpoint straight into QRESU,
equals the dense load followed by sparsify_ → prune_ → enter_qresu_ (codes, scales, masks, θ: bitwise)."""

import os

import pytest
import torch

import resu
from resu.tensors.quantized import QuantFormat

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

VOCAB = 80
QUANT = [dict(scheme="nf4", group_size=16, double_quant=True), dict(bits=4, scheme="per_group", group_size=8),
         dict(bits=8, scheme="per_channel")]


def _config(tied):
    return transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=32, vocab_size=VOCAB,
                                    tie_word_embeddings=tied)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    """A tiny Llama with random weights saved as safetensors shards (with an index file)."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(request.param))
    model.save_pretrained(folder, max_shard_size="30KB")
    assert os.path.isfile(folder / "model.safetensors.index.json")
    return folder, request.param


def _dense_then_qresu(folder, sparsity, quant, **prune_kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    resu.sparsify_(model)
    resu.prune_(model, sparsity, **prune_kw)
    resu.enter_qresu_(model, epsilon=0.3, generator=torch.Generator().manual_seed(4), **quant)
    return model


def _empty(tied):
    with accelerate.init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real
        return transformers.AutoModelForCausalLM.from_config(_config(tied)).eval()


def _assert_same(ref, got):
    a, b = dict(ref.named_parameters()), dict(got.named_parameters())
    assert a.keys() == b.keys()
    for name, p in a.items():
        q = b[name]
        assert type(p) is type(q) and q.device.type == "cpu", name
        if isinstance(p, resu.ResuParameter):
            la, lb = p.resu_layout.to_dict(), q.resu_layout.to_dict()
            la.pop("layout_id"), lb.pop("layout_id")
            assert la == lb, name
            for attr in p.resu_layout.inner_names:
                x, y = getattr(p, attr), getattr(q, attr)
                assert x.dtype == y.dtype and torch.equal(x, y), (name, attr)
            assert p.requires_grad and q.requires_grad
        else:
            assert torch.equal(p, q), name
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)


@pytest.mark.parametrize("quant", QUANT, ids=lambda q: q["scheme"])
def test_sharded_folder_loads_like_dense_prune_and_enter_qresu(checkpoint, quant):
    folder, tied = checkpoint
    ref = _dense_then_qresu(folder, 0.5, quant)
    model = _empty(tied)
    out = resu.load_quantized_(model, folder, 0.5, epsilon=0.3, generator=torch.Generator().manual_seed(4), **quant)
    assert out is model
    _assert_same(ref, model)
    if tied:  # the head shares the embedding: it stays one dense tensor
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert not isinstance(model.lm_head.weight, resu.ResuParameter)
    assert model.model.layers[0].mlp.down_proj.weight.quant_format == QuantFormat(
        quant.get("bits", 4), quant["scheme"], quant.get("group_size", 128), quant.get("double_quant", False))


def test_shard_list_and_state_dict_iterator_sources(checkpoint):
    folder, tied = checkpoint
    ref = _dense_then_qresu(folder, 0.3, QUANT[0], scope="global")
    shards = sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    assert len(shards) > 1
    model = _empty(tied)
    resu.load_quantized_(model, shards, 0.3, scope="global", epsilon=0.3, generator=torch.Generator().manual_seed(4),
                         **QUANT[0])
    _assert_same(ref, model)

    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    items = (kv for kv in dense.state_dict().items())  # a generator: one pass, in model order
    model = _empty(tied)
    resu.load_quantized_(model, items, 0.3, scope="global", epsilon=0.3, generator=torch.Generator().manual_seed(4),
                         **QUANT[0])
    _assert_same(ref, model)
    for k, v in dense.state_dict().items():  # pruning did not write through the caller's tensors
        assert torch.equal(v, before[k]), k


def test_a_single_file_and_2_4_pattern(tmp_path):
    torch.manual_seed(1)
    dense = transformers.AutoModelForCausalLM.from_config(_config(False))
    dense.save_pretrained(tmp_path)  # one model.safetensors
    ref = _dense_then_qresu(tmp_path, 0.5, {"scheme": "nf4", "group_size": 16}, pattern="2:4")
    model = _empty(False)
    resu.load_quantized_(model, tmp_path / "model.safetensors", 0.5, pattern="2:4", scheme="nf4", group_size=16,
                         epsilon=0.3, generator=torch.Generator().manual_seed(4))
    _assert_same(ref, model)


def _still_empty(model):
    return all(p.device.type == "meta" and not isinstance(p, resu.ResuParameter) for p in model.parameters())


def test_bad_checkpoints_raise_and_leave_the_model_unchanged(checkpoint):
    folder, tied = checkpoint
    state = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    last = list(state)[-1]
    cases = {
        "no tensor for": {k: v for k, v in state.items() if k != last},
        "does not": {**state, "model.extra.weight": torch.zeros(3)},
        "shape": {**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(5, 48)},
        "floating": {**state, "model.layers.0.self_attn.q_proj.weight": torch.zeros(48, 48, dtype=torch.int32)},
    }
    for match, bad in cases.items():
        model = _empty(tied)
        with pytest.raises(ValueError, match=match):
            resu.load_quantized_(model, bad, 0.5, scheme="nf4", group_size=16)
        assert _still_empty(model), match
    with torch.device("meta"):  # rotary frequencies (not persistent) on meta: they could never get values
        on_meta = transformers.AutoModelForCausalLM.from_config(_config(tied))
    with pytest.raises(ValueError, match="init_empty_weights"):
        resu.load_quantized_(on_meta, folder, 0.5)
    assert _still_empty(on_meta)
    model = _empty(tied)
    with pytest.raises(ValueError, match="calibration"):
        resu.load_quantized_(model, folder, 0.5, method="wanda")
    with pytest.raises(ValueError, match="double_quant"):
        resu.load_quantized_(model, folder, 0.5, scheme="per_group", double_quant=True)
    with pytest.raises(ValueError, match="neither"):
        resu.load_quantized_(model, folder / "nope.safetensors", 0.5)
    with pytest.raises(ValueError, match="twice"):
        resu.load_quantized_(model, list(state.items()) + [(last, state[last])], 0.5)
    assert _still_empty(model)


def test_a_model_with_resu_parameters_is_refused(checkpoint):
    folder, _ = checkpoint
    model = resu.sparsify_(transformers.AutoModelForCausalLM.from_pretrained(folder))
    with pytest.raises(ValueError, match="already has ResuParameters"):
        resu.load_quantized_(model, folder, 0.5)


def test_a_corrupt_or_truncated_file_is_refused_before_anything_changes(tmp_path):
    torch.manual_seed(2)
    transformers.AutoModelForCausalLM.from_config(_config(False)).save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    bad = {
        "truncated.safetensors": raw[: len(raw) - 100],
        "header.safetensors": raw[:8] + b"{" * n + raw[8 + n:],
        "length.safetensors": (len(raw) * 2).to_bytes(8, "little") + raw[8:],
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        model = _empty(False)
        with pytest.raises(ValueError, match="safetensors|does not match"):
            resu.load_quantized_(model, tmp_path / name, 0.5)
        assert _still_empty(model), name
