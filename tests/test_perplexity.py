"""perplexity and generate_text: a hand computation, every mode, train/eval flags given back."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resu
from resu.eval import generate_text, perplexity

transformers = pytest.importorskip("transformers")

VOCAB = 80


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (3, 7), generator=g)]


def _by_hand(model, batches):
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids).logits
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def test_matches_a_hand_computation():
    model = _llama().eval()
    batches = _batches()
    assert perplexity(model, batches) == pytest.approx(_by_hand(model, batches), rel=1e-5)


def test_attention_mask_excludes_padding():
    model = _llama().eval()
    ids = _batches()[0]
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0  # the second row has 8 real tokens
    got = perplexity(model, [{"input_ids": ids, "attention_mask": attention}])
    expected = _by_hand(model, [ids[:1], ids[1:, :8]])
    assert got == pytest.approx(expected, rel=1e-4)


def test_forward_fn_and_plain_modules():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    batches = _batches()
    got = perplexity(net, batches)
    nll = sum(F.cross_entropy(net(b)[:, :-1].reshape(-1, VOCAB), b[:, 1:].reshape(-1), reduction="sum").item() for b in batches)
    assert got == pytest.approx(math.exp(nll / sum(b[:, 1:].numel() for b in batches)), rel=1e-5)
    assert perplexity(net, batches, forward_fn=lambda m, b: m(b) * 0.0) == pytest.approx(VOCAB, rel=1e-5)


def test_every_mode_and_flags_restored():
    model = resu.sparsify_(_llama())
    batches = _batches()
    model.train()
    dense = perplexity(model, batches)
    assert model.training and all(m.training for m in model.modules())
    resu.prune_(model, 0.5, method="magnitude")
    sparse = perplexity(model, batches)
    assert sparse == pytest.approx(_by_hand(model, batches), rel=1e-5) and sparse != dense
    resu.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    resu_ppl = perplexity(model, batches)
    assert resu_ppl == pytest.approx(_by_hand(model, batches), rel=1e-5) and resu_ppl != sparse
    resu.exit_resu_(model, commit=False)
    resu.enter_qresu_(model, bits=4, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    qresu_ppl = perplexity(model, batches)
    assert math.isfinite(qresu_ppl) and qresu_ppl == pytest.approx(_by_hand(model, batches), rel=1e-5)
    model.eval()
    perplexity(model, batches)
    assert not model.training


def test_empty_batches_raise():
    with pytest.raises(ValueError, match="no predicted token"):
        perplexity(_llama(), [])
    with pytest.raises(TypeError, match="forward_fn"):
        perplexity(_llama(), ["text"])


class _CharTokenizer:
    """Each character a token (its code), enough for the generation loop."""

    eos_token_id = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}

    def decode(self, ids, skip_special_tokens=True):
        return ",".join(str(int(i)) for i in ids)


def test_generate_text_is_greedy_on_a_sparse_model():
    model = resu.sparsify_(_llama(seed=3))
    resu.prune_(model, 0.5, method="magnitude")
    tok = _CharTokenizer()
    text = generate_text(model, tok, "hello", max_new_tokens=5)
    ids = tok("hello")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if int(nxt) == 0:
                break
    assert text == tok.decode(ids[0, 5:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(model, tok, "hello", max_new_tokens=0)
