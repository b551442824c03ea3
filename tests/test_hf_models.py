"""Hugging Face models built from a config (no download): converted in place, pruned, trained, compiled."""

import io

import pytest
import torch

import resu

transformers = pytest.importorskip("transformers")


def _llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def _ids(seed=0):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_llama_converts_in_place_with_identical_outputs():
    model = _llama()
    ids = _ids()
    ref = model(ids).logits
    types_before = {n: type(m) for n, m in model.named_modules()}
    assert resu.sparsify_(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(p, resu.ResuParameter) for p in model.parameters()) == n_linear
    assert torch.equal(model(ids).logits, ref)


def test_tied_lm_head_is_left_dense_with_a_warning():
    model = _llama(tie=True)
    with pytest.warns(UserWarning, match="lm_head"):
        resu.sparsify_(model)
    assert not isinstance(model.lm_head.weight, resu.ResuParameter)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, resu.ResuParameter)


def test_llama_wanda_resu_training_keeps_active_weights_frozen_and_round_trips():
    model = resu.sparsify_(_llama())
    ids = _ids()
    resu.prune_(model, 0.5, method="wanda", calib=[{"input_ids": ids}])
    resu.enter_resu_(model, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    rps = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    frozen = [(p.effective_weight().clone(), p.active_mask) for p in rps]
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss / 2
        loss.backward()  # two micro-batches of gradient accumulation
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (model(input_ids=ids, labels=ids).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, (w0, active) in zip(rps, frozen):
        assert torch.equal(p.effective_weight()[active], w0[active])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = resu.sparsify_(_llama(seed=1))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_llama_compiles_fullgraph_in_resu_mode():
    model = resu.sparsify_(_llama())
    ids = _ids()
    resu.prune_(model, 0.5)
    resu.enter_resu_(model, epsilon=0.1)
    eager = model(input_ids=ids, labels=ids)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(q.grad, resu.CompactGrad) and q.grad.values.numel() == q.n_pruned


def test_llama_qresu_trains_theta_compiled_and_round_trips():
    model = resu.sparsify_(_llama())
    ids = _ids()
    resu.prune_(model, 0.3, method="wanda", calib=[{"input_ids": ids}])
    resu.enter_qresu_(model, bits=4, scheme="per_group", group_size=16, generator=torch.Generator().manual_seed(0))
    rps = [p for p in model.parameters() if isinstance(p, resu.ResuParameter)]
    assert all(p.mode is resu.ResuMode.QRESU and p._weight is None for p in rps)
    codes = [p._qdata.clone() for p in rps]
    opt = resu.ResuAdamW(model.parameters(), lr=1e-2)
    compiled = torch.compile(model, fullgraph=True)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p._qdata, c) for p, c in zip(rps, codes))  # frozen, bitwise
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = resu.sparsify_(_llama(seed=1))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
