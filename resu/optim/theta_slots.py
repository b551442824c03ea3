"""Where a weight's θ lives, and the three AdamW steps ResuAdamW takes on it.

A θ step is ``(target, compact grad values, states)``. The target is either

- a plain 1-D tensor: θ as a compact vector (QRESU's ``p._theta``), or
- :class:`PrunedSlots`: θ stored in the pruned slots of a dense weight (RESU's ``p._weight``), in
  ascending flat-index order. On CUDA with a bitmap mask the steps run straight on the weight (one
  fused pass, no index tensor); otherwise the θ values are gathered through the mask, stepped as a
  compact vector and scattered back.

Steps: every slot (:func:`adamw_all_`), the slots whose selection key is ≥ a threshold
(:func:`adamw_where_key_`, consistency strategy), or a fixed subset with compact states
(:func:`adamw_subset_`, static strategies).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from resu.compile.adamw_math import adamw_update_
from resu.compile.masked_ops import masked_adamw_
from resu.compile.theta_adamw import theta_adamw_, theta_adamw_where_key_
from resu.tensors import mask as mask_ops

_BITMAP = mask_ops.MaskEncoding.BITMAP


def _use_triton(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda and t.is_contiguous() for t in tensors)


@dataclasses.dataclass(frozen=True)
class PrunedSlots:
    """θ held in the pruned slots of ``weight`` (a dense tensor), as described by a mask encoding."""

    weight: torch.Tensor
    storage: torch.Tensor
    encoding: mask_ops.MaskEncoding
    n_pruned: int

    @classmethod
    def of(cls, p) -> "PrunedSlots":
        """The θ slots of a RESU-mode ResuParameter."""
        return cls(p._weight, p._mask_storage, p._encoding, p.n_pruned)

    def flat_indices(self) -> torch.Tensor:
        """int64 flat positions of the θ slots in ``weight``, ascending."""
        return mask_ops.pruned_flat_indices(self.storage, self.encoding, self.weight.numel(), self.n_pruned)

    def fused(self) -> bool:
        """True when the Triton bitmap kernel can step the weight in place."""
        return self.encoding is _BITMAP and _use_triton(self.weight)


ThetaTarget = Union[torch.Tensor, PrunedSlots]


def positions_in_target(target: ThetaTarget, theta_index: torch.Tensor) -> torch.Tensor:
    """Where θ slots ``theta_index`` sit in the flattened target storage."""
    if isinstance(target, PrunedSlots):
        return target.flat_indices().index_select(0, theta_index)
    return theta_index


@torch.no_grad()
def adamw_all_(target: ThetaTarget, grad, exp_avg, exp_avg_sq, max_exp_avg_sq: Optional[torch.Tensor], step: int, **hyper):
    """Plain AdamW on every θ slot (``grad`` compact, or weight-shaped for :class:`PrunedSlots`)."""
    if isinstance(target, PrunedSlots):
        masked_adamw_(target.weight, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, target.storage,
                      target.encoding.value, target.n_pruned, True, step, **hyper)
    elif max_exp_avg_sq is not None:  # AMSGrad: the reference math
        adamw_update_(target, grad.reshape(-1).to(target.dtype), exp_avg, exp_avg_sq, max_exp_avg_sq, step, **hyper)
    else:
        theta_adamw_(target, grad.reshape(-1), exp_avg, exp_avg_sq, step, **hyper)


@torch.no_grad()
def adamw_where_key_(target: ThetaTarget, grad, exp_avg, exp_avg_sq, step: int, keys, threshold, **hyper) -> None:
    """AdamW on the θ slots with ``keys >= threshold``; compact grad, states sized like θ."""
    if isinstance(target, torch.Tensor):
        theta_adamw_where_key_(target, grad, exp_avg, exp_avg_sq, step, keys, threshold, **hyper)
    elif target.fused():
        from resu.compile.triton_selective import bitmap_key_adamw_triton_

        bitmap_key_adamw_triton_(target.weight, grad, exp_avg, exp_avg_sq, target.storage, keys, threshold, step, **hyper)
    else:
        flat = target.weight.view(-1)
        index = target.flat_indices()
        theta = flat.index_select(0, index)
        theta_adamw_where_key_(theta, grad, exp_avg, exp_avg_sq, step, keys, threshold, **hyper)
        flat.index_copy_(0, index, theta)


@torch.no_grad()
def adamw_subset_(target: ThetaTarget, grad, exp_avg, exp_avg_sq, step: int, subset, positions, **hyper) -> None:
    """AdamW on the θ slots ``subset`` (sitting at ``positions`` of the flattened target); states sized
    ``len(subset)``. Nothing else is written."""
    flat = target.weight.view(-1) if isinstance(target, PrunedSlots) else target
    if _use_triton(flat, grad):
        from resu.compile.triton_selective import indexed_adamw_triton_

        indexed_adamw_triton_(flat, positions, grad, subset, exp_avg, exp_avg_sq, step, **hyper)
        return
    values = flat.index_select(0, positions)
    adamw_update_(values, grad.index_select(0, subset).to(values.dtype), exp_avg, exp_avg_sq, None, step, **hyper)
    flat.index_copy_(0, positions, values)
