"""Models and bit-level helpers shared by the model-level API tests (sparsify_, prune_, the θ phases)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from resu import ResuParameter


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def eff(p: torch.Tensor) -> torch.Tensor:
    """The weight a forward uses, as a plain detached tensor."""
    return p.effective_weight() if isinstance(p, ResuParameter) else p.detach()


def pruned_of(p: ResuParameter) -> torch.Tensor:
    return ~p.active_mask


class Net(nn.Module):
    """A few Linear layers (with and without bias, one frozen) next to non-Linear modules."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.fc2 = nn.Linear(64, 24, bias=False)
        self.frozen = nn.Linear(24, 8)
        self.frozen.weight.requires_grad_(False)
        self.frozen.bias.requires_grad_(False)

    def forward(self, x):
        h = F.gelu(self.norm(self.fc1(x)))
        h = self.conv(h.unsqueeze(1)).flatten(1)
        return self.frozen(torch.tanh(self.fc2(h)))


LINEARS = ("fc1", "fc2", "frozen")


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def rand_input(*shape, seed: int = 100) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert x.abs().sum() > 0
    return x


def random_weight_linear(out_f: int, in_f: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


# --------------------------------------------------------------------------
# a Hugging Face style decoder
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TinyConfig:
    vocab_size: int = 50
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 16
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True


class TinyAttention(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, h):
        b, t, d = h.shape
        hd = d // self.n_heads

        def heads(z):
            return z.view(b, t, self.n_heads, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(ctx)


class TinyMLP(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h):
        return self.down_proj(F.gelu(self.up_proj(h)))


class TinyBlock(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = TinyAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = TinyMLP(config)

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyModel(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TinyBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1])
        h = self.embed_tokens(input_ids) + self.embed_positions(pos)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class TinyForCausalLM(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))


PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def make_lm(tie: bool = True, seed: int = 0) -> TinyForCausalLM:
    torch.manual_seed(seed)
    return TinyForCausalLM(TinyConfig(tie_word_embeddings=tie))


def lm_ids(seed: int, batch: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed))


class SharedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.c = nn.Linear(12, 6)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def expected_row_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = scores.argsort(dim=1)
    out = torch.zeros_like(scores, dtype=torch.bool)
    out.scatter_(1, order[:, :k], True)
    return out
