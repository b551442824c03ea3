"""Tensor types: the ResuParameter subclass and its layout spec, its compact gradient, and the adaptive mask."""

from resu.tensors.compact_grad import CompactGrad
from resu.tensors.layout import ResuLayout, WritePolicy
from resu.tensors.mask import MaskEncoding, SparseMask
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

__all__ = ["CompactGrad", "MaskEncoding", "ResuLayout", "ResuMode", "ResuParameter", "SparseMask", "WritePolicy"]
