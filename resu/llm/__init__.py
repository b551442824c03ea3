"""Pretrained language models and text for the pruning-and-recovery workflow."""

from resu.llm.smollm2 import load_smollm2, smollm2_dir
from resu.llm.stdlib_text import split_of, stdlib_files, token_batches

__all__ = ["load_smollm2", "smollm2_dir", "split_of", "stdlib_files", "token_batches"]
