"""AdamW over a compact, contiguous θ vector (QRESU's flat θ, or RESU θ gathered out of its weight).

Three ways to pick the slots to update, all one pass:

- every slot (``selected=None``); states sized like θ;
- a bool mask ``selected`` sized like θ; states sized like θ, and unselected entries of θ and of
  the states are never written;
- an integer index vector ``selected`` (k distinct θ indices); states sized k (state i belongs to
  θ[selected[i]]), as for a static subset;
- and, through :func:`theta_adamw_where_key_`, the slots whose selection key is ≥ a threshold (the
  consistency strategy of RESU-Selective), with states sized like θ.

CUDA tensors take the Triton kernels of :mod:`resu.compile.triton_selective`; everything else takes
the references here, built on :func:`resu.compile.adamw_math.adamw_update_` (bitwise equal to
``torch.optim.AdamW``'s single-tensor path on CPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from resu.compile.adamw_math import adamw_update_


def _use_triton(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda and t.is_contiguous() for t in tensors)


def _check(theta, grad, exp_avg, exp_avg_sq, selected) -> None:
    if theta.dim() != 1:
        raise ValueError(f"theta_adamw_: `theta` must be a 1-D vector, got shape {tuple(theta.shape)}")
    if grad.numel() != theta.numel():
        raise ValueError(f"theta_adamw_: `grad` has {grad.numel()} values for {theta.numel()} θ slots; pass the compact gradient")
    n_states = theta.numel()
    if selected is not None:
        if selected.dtype == torch.bool:
            if selected.numel() != theta.numel():
                raise ValueError(f"theta_adamw_: bool `selected` must have one entry per θ slot ({theta.numel()}), got {selected.numel()}")
        elif selected.dtype in (torch.int32, torch.int64):
            n_states = selected.numel()
        else:
            raise ValueError(f"theta_adamw_: `selected` must be a bool mask or an int64 index vector, got {selected.dtype}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.numel() != n_states:
            raise ValueError(f"theta_adamw_: `{name}` must have {n_states} entries, got {t.numel()}")


@torch.no_grad()
def theta_adamw_(
    theta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    selected: Optional[torch.Tensor] = None,
) -> None:
    """One AdamW step (decoupled weight decay, ``step`` counting from 1) on θ in place.

    Args:
        theta: 1-D θ vector (p values).
        grad: its gradient, p values.
        exp_avg, exp_avg_sq: Adam states: p values, or k with an index ``selected``.
        selected: None (update every slot), a bool mask of p entries, or k distinct int64 θ indices.
            Weight decay applies only to the updated slots.
    """
    _check(theta, grad, exp_avg, exp_avg_sq, selected)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
    if _use_triton(theta, grad, exp_avg, exp_avg_sq):
        from resu.compile import triton_selective as ts

        if selected is None:
            ts.theta_adamw_triton_(theta, grad, exp_avg, exp_avg_sq, step, **hyper)
        elif selected.dtype == torch.bool:
            ts.theta_adamw_triton_(theta, grad, exp_avg, exp_avg_sq, step, **hyper,
                                   select_mode=ts.SELECT_MASK, selector=selected.contiguous())
        else:
            index = selected.to(torch.int64).contiguous()
            ts.indexed_adamw_triton_(theta, index, grad, index, exp_avg, exp_avg_sq, step, **hyper)
        return
    theta_adamw_reference_(theta, grad, exp_avg, exp_avg_sq, step, **hyper, selected=selected)


@torch.no_grad()
def theta_adamw_reference_(theta, grad, exp_avg, exp_avg_sq, step, *, selected=None, **hyper) -> None:
    """Reference for :func:`theta_adamw_`: gather the updated slots, the AdamW math, scatter back."""
    if selected is None:
        adamw_update_(theta, grad.to(theta.dtype), exp_avg, exp_avg_sq, None, step, **hyper)
        return
    if selected.dtype == torch.bool:
        indexed_adamw_reference_(theta, grad, exp_avg, exp_avg_sq, step, index=selected.nonzero().squeeze(1),
                                 states_indexed=True, **hyper)
    else:
        indexed_adamw_reference_(theta, grad, exp_avg, exp_avg_sq, step, index=selected.to(torch.int64),
                                 states_indexed=False, **hyper)


@torch.no_grad()
def indexed_adamw_reference_(theta, grad, exp_avg, exp_avg_sq, step, *, index, states_indexed, **hyper) -> None:
    """AdamW on ``theta[index]`` with ``grad[index]``; states are indexed too (``states_indexed``) or
    already compact (k values)."""
    values = theta.index_select(0, index)
    g = grad.index_select(0, index).to(values.dtype)
    if states_indexed:
        m, v = exp_avg.index_select(0, index), exp_avg_sq.index_select(0, index)
    else:
        m, v = exp_avg, exp_avg_sq
    adamw_update_(values, g, m, v, None, step, **hyper)
    theta.index_copy_(0, index, values)
    if states_indexed:
        exp_avg.index_copy_(0, index, m)
        exp_avg_sq.index_copy_(0, index, v)


@torch.no_grad()
def theta_adamw_where_key_(
    theta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    keys: torch.Tensor,
    threshold: torch.Tensor,
    **hyper,
) -> None:
    """AdamW on the θ slots whose int64 selection key is ≥ ``threshold`` (a 0-d tensor on θ's device,
    read on device: no host sync). States are sized like θ; other slots are never written."""
    if _use_triton(theta, grad, exp_avg, exp_avg_sq, keys):
        from resu.compile import triton_selective as ts

        ts.theta_adamw_triton_(theta, grad, exp_avg, exp_avg_sq, step, **hyper,
                               select_mode=ts.SELECT_KEY, selector=keys, threshold=threshold)
        return
    theta_adamw_reference_(theta, grad, exp_avg, exp_avg_sq, step, **hyper, selected=keys >= threshold)


__all__ = ["indexed_adamw_reference_", "theta_adamw_", "theta_adamw_reference_", "theta_adamw_where_key_"]
