"""Saving and loading sparsified models: safetensors in every mode, Hugging Face ``save_pretrained`` export."""

import resu.io.storage_guard  # noqa: F401  (registers the clear error for storage-based serializers)
from resu.io.hf import LAYOUT_FILE, load_pretrained_, save_pretrained
from resu.io.hf_checkpointing import attach_hf_checkpointing
from resu.io.load_plan import LoadResult
from resu.io.quantize_on_load import load_quantized_
from resu.io.safetensors_file import load_safetensors_, save_safetensors

__all__ = ["LAYOUT_FILE", "LoadResult", "attach_hf_checkpointing", "load_pretrained_", "load_quantized_", "load_safetensors_", "save_pretrained", "save_safetensors"]
