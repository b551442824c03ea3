"""The ``resu`` op library: a thin helper over ``torch.library`` low-level registration.

``torch.library.custom_op`` wraps every call in several Python layers (argument normalisation,
a dynamo-disable wrapper), about 15 µs per call; the ops here run on every forward and backward of
every sparsified layer, so they are defined with ``Library.define``/``Library.impl`` instead
(about 2 µs), keeping the same pieces: a schema, a reference kernel for every device, an optional
CUDA kernel, and a fake (meta) implementation for ``torch.compile``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

LIB = torch.library.Library("resu", "DEF")


def define_op(
    schema: str, reference: Callable, *, fake: Callable, cuda: Optional[Callable] = None
) -> torch._ops.OpOverload:
    """Define ``resu::<schema>`` with ``reference`` as its kernel on every device, ``cuda`` (if given)
    overriding it on CUDA tensors, and ``fake`` for tracing. Returns the op overload."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None:
        LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"resu::{name}", fake, lib=LIB)
    return getattr(torch.ops.resu, name).default


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a step over ``tensors`` runs a Triton kernel: all on CUDA and contiguous.

    The one test every Python-side kernel choice makes (AdamW steps, RESU-Selective's passes); the
    custom ops choose by dispatch key instead. Tests patch it to run the kernels under the interpreter.
    """
    return all(t.is_cuda and t.is_contiguous() for t in tensors)
