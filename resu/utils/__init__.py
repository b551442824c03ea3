"""Utilities of the seed API: quantization helpers and memory accounting."""
