"""prune_'s calibration choice: block by block for Hugging Face decoders, whole-model hooks otherwise."""

import pytest
import torch

import resu

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    resu.sparsify_(model, filter_fn=lambda name, m: "lm_head" not in name)
    return model


def _masks(model) -> dict:
    return {n: p.active_mask.clone() for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_auto_calibrates_hugging_face_decoders_block_by_block(method):
    calib = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    auto, seq = _tiny_llama(), _tiny_llama()
    resu.prune_(auto, 0.5, method=method, calib=calib)
    resu.sequential_prune_(seq, method, 0.5, calib)
    for (name, a), b in zip(_masks(auto).items(), _masks(seq).values()):
        assert torch.equal(a, b), name
    for (name, p), q in zip(auto.named_parameters(), seq.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def test_whole_model_calibration_differs_downstream_of_the_first_block():
    calib = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    whole, seq = _tiny_llama(), _tiny_llama()
    resu.prune_(whole, 0.5, method="wanda", calib=calib, calibration="whole_model")
    resu.prune_(seq, 0.5, method="wanda", calib=calib, calibration="sequential")
    a, b = _masks(whole), _masks(seq)
    first = [n for n in a if ".layers.0." in n]
    later = [n for n in a if ".layers.2." in n]
    assert all(torch.equal(a[n], b[n]) for n in first)  # block 0 sees the same inputs either way
    assert any(not torch.equal(a[n], b[n]) for n in later)  # later blocks see the pruned upstream


def test_bad_calibration_choice_names_the_argument_and_changes_nothing():
    model = _tiny_llama()
    before = _masks(model)
    with pytest.raises(ValueError, match="calibration"):
        resu.prune_(model, 0.5, method="wanda", calib=[torch.zeros(1, 4, dtype=torch.long)], calibration="blockwise")
    assert all(p.mode is resu.ResuMode.DENSE for p in model.parameters() if isinstance(p, resu.ResuParameter))
    assert before.keys() == _masks(model).keys()
