"""``ResuAdamW``: AdamW that trains only the trainable slots of ResuParameters."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from resu.compile.masked_ops import masked_adamw_
from resu.compile.adamw_math import adamw_update_
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class ResuAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) that knows about :class:`~resu.tensors.resu_parameter.ResuParameter`.

    Same arguments, ``param_groups`` and ``state_dict`` conventions as ``torch.optim.AdamW``; plain
    parameters are updated exactly as AdamW does, and LR schedulers work as usual. For a ResuParameter
    only its trainable slots are touched, and Adam states exist only for them:

    - DENSE: every slot (as AdamW).
    - SPARSE: the active slots; pruned slots stay exactly zero.
    - RESU: the θ (pruned) slots; active slots stay bitwise unchanged, weight decay included.
    - QRESU: the flat θ vector; the quantized active weights are never touched.

    States are compact vectors over the trainable slots. When a weight's mask or mode changes (prune,
    enter or exit RESU) its states restart from zero for the new set of slots, reusing the same
    storage (no new allocation when the new set is not larger, e.g. SPARSE → RESU at sparsity ≤ 0.5).

    ``foreach`` and ``fused`` are accepted for signature compatibility and currently ignored;
    ``capturable`` and ``differentiable`` are not supported.
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, dict[str, Any]]],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("ResuAdamW: Tensor `lr` must be 1-element")
        if not 0.0 <= float(lr):
            raise ValueError(f"ResuAdamW: invalid `lr` {lr}; it must be >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"ResuAdamW: invalid `eps` {eps}; it must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"ResuAdamW: invalid `betas` {betas}; each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"ResuAdamW: invalid `weight_decay` {weight_decay}; it must be >= 0")
        if capturable or differentiable:
            raise ValueError("ResuAdamW: `capturable` and `differentiable` are not supported; leave them False")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _n_trainable(p: torch.Tensor) -> Optional[int]:
        """Number of trainable slots of ``p``, or None when every slot is trainable."""
        if not isinstance(p, ResuParameter) or p.mode is ResuMode.DENSE:
            return None
        return p.n_pruned if p.mode.trains_theta else p.numel() - p.n_pruned

    def _prepare_state(self, p: torch.Tensor, n: Optional[int], amsgrad: bool) -> dict:
        """The state of ``p``, (re)laid out for its current trainable slots."""
        state = self.state[p]
        layout = p._layout_id if isinstance(p, ResuParameter) else 0
        shape = p.shape if n is None else (n,)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["layout_id"] = layout
            for key in _STATE_KEYS[: 3 if amsgrad else 2]:
                state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        elif state.get("layout_id") != layout:
            if "layout_id" not in state and state["exp_avg"].shape == shape:
                # States without a layout (from torch.optim.AdamW, say) that fit: adopt them.
                state["layout_id"] = layout
            else:
                # New mask or mode: restart the states for the new slot set, in the old storage.
                state["step"].zero_()
                state["layout_id"] = layout
                for key in _STATE_KEYS:
                    if key in state:
                        state[key].resize_(shape).zero_()
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return state

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ResuAdamW does not support sparse gradients")
                self._step_param(p, group["amsgrad"], hyper)
        return loss

    def _step_param(self, p: torch.Tensor, amsgrad: bool, hyper: dict) -> None:
        n = self._n_trainable(p)
        state = self._prepare_state(p, n, amsgrad)
        state["step"] += 1
        step = int(state["step"].item())
        max_sq = state.get("max_exp_avg_sq") if amsgrad else None
        grad = p.grad
        if n is None:
            target = p._weight if isinstance(p, ResuParameter) else p
            if isinstance(grad, CompactGrad):
                grad = grad.to_dense()
            adamw_update_(target, grad, state["exp_avg"], state["exp_avg_sq"], max_sq, step, **hyper)
            return
        if isinstance(grad, CompactGrad):
            grad = grad.values
        if p.mode is ResuMode.QRESU:
            # θ is its own flat vector; a dense gradient (another op used the weight) gives its θ part.
            if grad.numel() != n:
                grad = p._gather_pruned(grad)
            adamw_update_(p._theta, grad.to(p._theta.dtype), state["exp_avg"], state["exp_avg_sq"], max_sq, step, **hyper)
            return
        masked_adamw_(
            p._weight, grad, state["exp_avg"], state["exp_avg_sq"], max_sq,
            p._mask_storage, p._encoding.value, p.n_pruned, p.mode is ResuMode.RESU, step, **hyper,
        )
