"""A tiny Llama built from a config and a character-level tokenizer with a chat template: enough of a
Hugging Face causal LM and tokenizer to run the LM workflow (demo, README code) without SmolLM2."""

import torch

VOCAB = 128


class CharTokenizer:
    """One token per character (code point mod 127); id 127 is the end-of-sequence token."""

    eos_token_id = VOCAB - 1

    def _encode(self, text: str) -> list[int]:
        return [ord(c) % (VOCAB - 1) for c in text]

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = self._encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids if not (skip_special_tokens and int(i) == self.eos_token_id))


def tiny_llama(seed: int = 0):
    """A 2-block Llama with tied embeddings (as SmolLM2), random weights, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()
