"""``torch.library`` custom ops (``torch.ops.resu.*``): schemas, fake impls, autograd, kernels."""

from resu.compile import linear, qlinear  # noqa: F401
