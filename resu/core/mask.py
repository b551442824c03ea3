"""``resu.core.mask.SparseMask``: the adaptive mask, under the seed API's import path."""

from resu.tensors.mask import MaskEncoding, MaskStats, SparseMask

__all__ = ["MaskEncoding", "MaskStats", "SparseMask"]
