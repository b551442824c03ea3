"""Saving and loading sparsified models: safetensors in every mode, Hugging Face ``save_pretrained`` export."""

from resu.io.load_plan import LoadResult
from resu.io.safetensors_file import load_safetensors_, save_safetensors

__all__ = ["LoadResult", "load_safetensors_", "save_safetensors"]
