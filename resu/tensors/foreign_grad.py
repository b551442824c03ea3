"""The hook that keeps a RESU weight's gradient compact when some op other than ``resu::linear`` used it."""

from __future__ import annotations

import torch

from resu.tensors.compact_grad import CompactGrad


def compact_foreign_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: in RESU mode, keep only the θ part of a dense gradient.

    Gradients normally arrive compact through ``resu::linear``. A weight used by some other op as
    well (``x @ W.t()``, or a composite functional such as ``F.multi_head_attention_forward`` that
    calls ``linear`` internally) receives a dense gradient from aten's formulas; its active-slot part
    belongs to frozen weights, so it is dropped here and the gradient becomes a CompactGrad.
    """
    grad = param.grad
    if param.mode.trains_theta and grad is not None and not isinstance(grad, CompactGrad):
        layout = param.resu_layout
        with torch.no_grad():
            values = torch.ops.resu.gather_masked(
                grad, param._mask_storage, layout.encoding_name, layout.n_pruned, True, param.dtype
            )
        param.grad = CompactGrad(values, param._mask_storage, layout.encoding, param.shape)
