"""Compatibility namespace for the seed API (``resu.core.mask.SparseMask``)."""
