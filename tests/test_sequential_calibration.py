"""Block-by-block calibration: the same masks as whole-model calibration where they must agree."""

import copy

import pytest
import torch
import torch.nn as nn

import resu
from resu.prune.blocks import capture_block_inputs, find_blocks
from resu.prune.calibration import default_forward
from resu.prune.registry import PRUNE_METHODS, PruneSpec, register_prune_method
from resu.prune.select import lowest_scores
from resu.prune.sequential import sequential_prune_, whole_model_prune_

transformers = pytest.importorskip("transformers")

# Wanda written out here, so the test does not depend on which methods are registered elsewhere.
TEST_WANDA = "wanda (sequential calibration test)"
if TEST_WANDA not in PRUNE_METHODS.names():

    @register_prune_method(TEST_WANDA, statistic="input_sqnorm")
    def _test_wanda(weight, stat, spec):
        return lowest_scores(weight.abs() * stat.sqrt(), spec.sparsity, spec.scope)


TEST_MAGNITUDE = "magnitude (sequential calibration test)"
if TEST_MAGNITUDE not in PRUNE_METHODS.names():

    @register_prune_method(TEST_MAGNITUDE)
    def _test_magnitude(weight, stat, spec):
        assert stat is None
        return lowest_scores(weight.abs(), spec.sparsity, spec.scope)


VOCAB = 96


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return resu.sparsify_(transformers.LlamaForCausalLM(cfg))


def _qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    with pytest.warns(UserWarning, match="tied"):
        return resu.sparsify_(transformers.Qwen2ForCausalLM(cfg))


def _calib(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def _pruned(p):
    return p._pruned_bool().view(p.shape).clone()


def _masks(model):
    return {n: _pruned(p) for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}


def _hand_wanda_(model, names, calib, sparsity):
    """Whole-model Wanda written with plain hooks: prune the weights in ``names`` from full forwards."""
    sums, handles = {}, []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{mod_name}.weight" in names:
            def hook(m, inp, out, key=f"{mod_name}.weight"):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for ids in calib:
            model(ids)
    for h in handles:
        h.remove()
    params = dict(model.named_parameters())
    for key in names:
        w = params[key].effective_weight().float()
        params[key]._apply_pruning_(lowest_scores(w.abs() * sums[key].sqrt(), sparsity, "row"))


def test_block_detection_on_hf_decoders():
    llama = _llama()
    assert find_blocks(llama) == list(llama.model.layers)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64)
    )
    assert find_blocks(gpt2) == list(gpt2.transformer.h)
    assert find_blocks(llama, "model.layers") == list(llama.model.layers)
    assert find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))) is None
    with pytest.raises(ValueError, match="not a submodule path"):
        find_blocks(llama, "model.blocks")
    with pytest.raises(ValueError, match="ModuleList"):
        find_blocks(llama, "model.norm")


def test_capture_stops_at_the_first_block():
    model = _llama()
    ran = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: ran.append(1))
    model.lm_head.register_forward_pre_hook(lambda m, a: ran.append(1))
    inputs = capture_block_inputs(model, model.model.layers[0], _calib(2), default_forward)
    assert ran == [] and len(inputs) == 2
    emb = model.model.embed_tokens(_calib(2)[1])
    assert torch.equal(inputs[1].hidden, emb)
    assert model.config.use_cache is True  # turned off for the capture only
    # replaying block 0 on the captured inputs gives what the model computes
    out = model(_calib(2)[1], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(model.model.layers[0](*inputs[1].args, **inputs[1].kwargs), out)


def test_block_zero_masks_equal_whole_model_wanda():
    """Block 0 sees the same inputs whichever way it is calibrated: the masks must be identical,
    including against the library's own whole-model ``prune_(method="wanda")``."""
    calib = _calib()
    seq = _llama()
    whole = copy.deepcopy(seq)
    sequential_prune_(seq, TEST_WANDA, PruneSpec(0.5), calib)
    resu.prune_(whole, 0.5, method="wanda", calib=calib, calibration="whole_model")
    seq_masks, whole_masks = _masks(seq), _masks(whole)
    block0 = [n for n in seq_masks if n.startswith("model.layers.0.")]
    assert len(block0) == 7
    for name in block0:
        assert torch.equal(seq_masks[name], whole_masks[name]), name


def test_every_mask_equals_whole_model_wanda_on_the_pruned_upstream():
    """Later blocks see the *pruned* upstream: compare with whole-model calibrations run block after
    block, each on the model whose earlier blocks are already pruned, then the head on the pruned blocks."""
    calib = _calib()
    seq = _llama(seed=1)
    ref = copy.deepcopy(seq)
    sequential_prune_(seq, TEST_WANDA, PruneSpec(0.6), calib)
    names = [n for n, p in ref.named_parameters() if isinstance(p, resu.ResuParameter)]
    for group in (["model.layers.0."], ["model.layers.1."], ["lm_head."]):
        _hand_wanda_(ref, [n for n in names if any(n.startswith(g) for g in group)], calib, 0.6)
    seq_masks, ref_masks = _masks(seq), _masks(ref)
    assert seq_masks.keys() == ref_masks.keys() and len(seq_masks) == 15
    for name in names:
        assert torch.equal(seq_masks[name], ref_masks[name]), name
        assert abs(seq.get_parameter(name).sparsity - 0.6) < 0.01
    # and it is not the same as calibrating every block on the dense model
    unpruned = _llama(seed=1)
    resu.prune_(unpruned, 0.6, method="wanda", calib=calib, calibration="whole_model")
    assert not torch.equal(_masks(unpruned)["model.layers.1.mlp.down_proj.weight"], seq_masks["model.layers.1.mlp.down_proj.weight"])


def test_sequential_order_calibrates_after_earlier_layers_are_pruned():
    calib = _calib()
    parallel, ordered = _llama(seed=2), _llama(seed=2)
    sequential_prune_(parallel, TEST_WANDA, PruneSpec(0.5), calib, order="parallel")
    sequential_prune_(ordered, TEST_WANDA, PruneSpec(0.5), calib, order="sequential")
    p, o = _masks(parallel), _masks(ordered)
    # the first layer of the block sees the unpruned block either way; the output projection does not
    assert torch.equal(p["model.layers.0.self_attn.q_proj.weight"], o["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(p["model.layers.0.self_attn.o_proj.weight"], o["model.layers.0.self_attn.o_proj.weight"])


@pytest.mark.parametrize("build", [_llama, _qwen2])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_sequential_on_hf_decoders(build, pattern):
    calib = _calib()
    model = build()
    with torch.no_grad():
        dense_logits = model(calib[0]).logits
    model.train()
    sequential_prune_(model, "sparsegpt", PruneSpec(0.5, pattern=pattern), calib)
    assert model.training  # train/eval flags are given back
    for name, p in model.named_parameters():
        if isinstance(p, resu.ResuParameter):
            assert p.mode is resu.ResuMode.SPARSE and p.sparsity == 0.5, name
            if pattern is not None:
                assert (_pruned(p).reshape(p.shape[0], -1, 4).sum(-1) == 2).all(), name
            assert (p.effective_weight()[_pruned(p)] == 0).all()
    with torch.no_grad():
        logits = model(calib[0]).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)


def test_sparsegpt_sequential_reconstructs_better_than_without_update():
    """SparseGPT's weight update matters at the model level too: its logits stay closer to the dense
    model's than the same masks without the update."""
    calib = _calib(4)
    model = _llama(seed=3)
    with torch.no_grad():
        dense = model(calib[0]).logits
    sequential_prune_(model, "sparsegpt", PruneSpec(0.5), calib)
    masks = _masks(model)
    plain = _llama(seed=3)
    for name, p in plain.named_parameters():
        if name in masks:
            p._apply_pruning_(masks[name])
    with torch.no_grad():
        err_sparsegpt = (model(calib[0]).logits - dense).norm()
        err_plain = (plain(calib[0]).logits - dense).norm()
    assert err_sparsegpt < err_plain


def test_whole_model_fallback_without_blocks():
    torch.manual_seed(0)
    net = resu.sparsify_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)))
    ref = copy.deepcopy(net)
    calib = [torch.randn(10, 16) for _ in range(3)]
    sequential_prune_(net, TEST_WANDA, PruneSpec(0.5), calib)
    resu.prune_(ref, 0.5, method="wanda", calib=calib)
    for (name, a), b in zip(_masks(net).items(), _masks(ref).values()):
        assert torch.equal(a, b), name


def test_methods_without_statistic_need_no_calibration():
    model = _llama()
    ref = copy.deepcopy(model)
    sequential_prune_(model, TEST_MAGNITUDE, 0.5, None)
    resu.prune_(ref, 0.5, method="magnitude")
    for (name, a), b in zip(_masks(model).items(), _masks(ref).values()):
        assert torch.equal(a, b), name


def test_errors_are_clear_and_change_nothing():
    model = _llama()
    before = {
        n: (p.effective_weight() if isinstance(p, resu.ResuParameter) else p.detach()).clone()
        for n, p in model.named_parameters()
    }
    with pytest.raises(ValueError, match="unknown `method`"):
        sequential_prune_(model, "no-such-method", 0.5, _calib())
    with pytest.raises(ValueError, match="calibration data"):
        sequential_prune_(model, "sparsegpt", 0.5, [])
    with pytest.raises(ValueError, match="order"):
        sequential_prune_(model, "sparsegpt", 0.5, _calib(), order="random")
    with pytest.raises(ValueError, match="sparsify_"):
        sequential_prune_(nn.Linear(4, 4), "sparsegpt", 0.5, _calib())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach() if not isinstance(p, resu.ResuParameter) else p.effective_weight(), before[n])
        assert not isinstance(p, resu.ResuParameter) or p.mode is resu.ResuMode.DENSE
    sequential_prune_(model, "sparsegpt", 0.5, _calib())
    resu.enter_resu_(model)
    with pytest.raises(ValueError, match="exit_resu_"):
        sequential_prune_(model, "sparsegpt", 0.5, _calib())


def test_a_failing_method_names_the_layer():
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.copy_(torch.full((128, 64), float("nan")))
    with pytest.raises(RuntimeError, match=r"`model\.layers\.1\.mlp\.(up|down)_proj\.weight`"):
        sequential_prune_(model, "sparsegpt", 0.5, _calib())


def test_one_gram_alive_at_a_time_and_one_per_distinct_input(monkeypatch):
    import resu.prune.sequential as sequential

    created, alive, peak = [], set(), [0]

    class Tracked(sequential.InputStatistic):
        def __init__(self, name, modules):
            super().__init__(name, modules)
            created.append(self)

        def _hook(self, module, inputs, output):
            super()._hook(module, inputs, output)
            alive.update(s for s in created if s.value is not None)
            alive.difference_update(s for s in created if s.value is None)
            peak[0] = max(peak[0], len(alive))

    monkeypatch.setattr(sequential, "InputStatistic", Tracked)
    model = _llama()
    sequential_prune_(model, "sparsegpt", PruneSpec(0.5), _calib())
    assert peak[0] == 1
    # per Llama block: q/k/v share one input, gate/up another, o_proj and down_proj one each; then lm_head
    assert len(created) == 2 * 4 + 1
    block0 = created[:4]
    assert [len(s.modules) for s in block0] == [1, 1, 1, 1]
    assert block0[0].modules[0] is model.model.layers[0].self_attn.q_proj


def test_whole_model_prune_only_some_weights():
    model = _llama()
    q0 = model.model.layers[0].self_attn.q_proj.weight
    whole_model_prune_(model, "sparsegpt", PruneSpec(0.5, pattern=(4, 8)), _calib(), only=[q0])
    modes = {n: p.mode for n, p in model.named_parameters() if isinstance(p, resu.ResuParameter)}
    assert modes.pop("model.layers.0.self_attn.q_proj.weight") is resu.ResuMode.SPARSE
    assert set(modes.values()) == {resu.ResuMode.DENSE}
    assert (_pruned(q0).reshape(64, -1, 8).sum(-1) == 4).all()
    with pytest.raises(ValueError, match="order"):
        whole_model_prune_(model, "sparsegpt", PruneSpec(0.5), _calib(), order="any")
