"""``torch.library`` custom ops (``torch.ops.resu.*``): schemas, fake impls, autograd, kernels."""

from resu.compile import linear, masked_ops  # noqa: F401
