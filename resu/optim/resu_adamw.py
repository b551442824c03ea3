"""``ResuAdamW``: AdamW that trains only the trainable slots of ResuParameters."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim import adamw as torch_adamw

from resu.compile.adamw_math import adamw_update_
from resu.distributed.optim import attach_dtensor_hooks
from resu.distributed.select import shard_selection_of
from resu.optim.adamw_step import MaskedSlots, StepJob, Target, adamw_step_, adamw_steps_
from resu.optim.selection_config import SelectionConfig
from resu.optim.selective import (
    INTEGER_KEYS,
    SELECTIVE_KEYS,
    SelectionStats,
    selective_step_,
    state_layout,
)
from resu.tensors.compact_grad import CompactGrad
from resu.tensors.mode import ResuMode
from resu.tensors.resu_parameter import ResuParameter
from resu.optim.state_checks import check_optimizer_state

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

    ``foreach``: by default (None or True) the weights of a param group whose every trainable slot
    steps are stepped together, in one multi-tensor launch per kind of slots on CUDA; ``foreach=False``
    steps them one at a time (the same numbers bitwise on CPU; on CUDA the two compiled kernels round differently
    where the compiler fuses multiply-adds, as torch.optim's foreach and for-loop paths may).
    On CUDA, plain parameters (not ResuParameters) of such a group are stepped by torch's own
    multi-tensor AdamW, as ``torch.optim.AdamW(foreach=True)`` would step them; elsewhere, and with
    ``foreach=False``, one at a time. ``fused`` is accepted for signature compatibility and ignored.
    ``capturable`` and ``differentiable`` are not supported.

    ``selective`` (a :class:`~resu.optim.selection_config.SelectionConfig`, default None) turns on RESU-Selective
    for the θ of every ResuParameter of the group in RESU/QRESU mode: only the selected θ slots are
    updated each step (see :mod:`resu.optim.selective`); other parameters are stepped as usual. A param
    group may set its own ``selective``; a group with ``selective=None`` honours the config a weight was
    tagged with by ``resu.enter_resu_(model, selective=...)``. Not combinable with ``amsgrad``.
    :meth:`selection_stats` reports the last step's mean consistency and fraction of θ updated.
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
        selective: Optional[SelectionConfig] = None,
    ) -> None:
        _check_selective(selective, amsgrad)
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
            selective=selective,
        )
        self._selection_stats = SelectionStats()
        super().__init__(params, defaults)
        attach_dtensor_hooks(self)  # FSDP2: step each DTensor parameter's local shard

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_selective(
            param_group.get("selective", self.defaults["selective"]), param_group.get("amsgrad", self.defaults["amsgrad"])
        )
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        attach_dtensor_hooks(self)  # hooks are not part of the pickled state
        self._selection_stats = SelectionStats()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ selective: stats, state_dict
    def selection_stats(self) -> dict:
        """Statistics of RESU-Selective at the last :meth:`step` (one host sync).

        Returns a dict with ``mean_consistency`` (mean C over the θ slots of weights using the
        consistency strategy; 0.0 with static strategies or before any step), ``fraction_selected``
        (θ slots updated / θ slots of all selective weights), ``n_selected`` and ``n_slots``.
        """
        return self._selection_stats.as_dict()

    def selection_counts(self) -> SelectionStats:
        """The raw counts behind :meth:`selection_stats` for the last step, without a host sync: add
        them up over steps with :meth:`SelectionStats.accumulate` and read once with ``as_dict()``."""
        return self._selection_stats

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``; a group's ``selective`` config is stored as a plain
        dict, so the result loads with ``torch.load(..., weights_only=True)``."""
        out = super().state_dict()
        for group in out["param_groups"]:
            if isinstance(group.get("selective"), SelectionConfig):
                group["selective"] = group["selective"].to_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, restoring ``selective`` configs and keeping the
        integer selection states (subset indices) integral and on their parameter's device.

        All or nothing: every state the optimizer would use as it is (one laid out for its parameter's
        current slots) is checked against those slots first (:func:`resu.optim.state_checks.check_optimizer_state`:
        moment lengths, step, selective buffers and subset indices); a bad one raises a
        :class:`~resu.tensors.validate.CheckpointError` and the optimizer is left unchanged. The kernels
        trust these lengths, so a wrong one would otherwise write past a state buffer.
        """
        groups = []
        for group in state_dict["param_groups"]:
            if isinstance(group.get("selective"), dict):
                group = {**group, "selective": SelectionConfig.from_dict(group["selective"])}
            groups.append(group)
        self._check_loaded_states(state_dict.get("state"), groups)
        integral = {
            pid: {k: v for k, v in s.items() if k in INTEGER_KEYS and isinstance(v, torch.Tensor)}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "param_groups": groups})
        saved_ids = [pid for g in groups for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in integral.get(pid, {}).items():
                on_device = key in ("subset", "subset_positions")  # the others are host counters
                self.state[p][key] = value.clone().to(p.device if on_device else value.device)

    def _check_loaded_states(self, states: Any, groups: list) -> None:
        """Pair saved ids with parameters as torch does, and check each state that keeps its layout."""
        if not isinstance(states, dict) or len(groups) != len(self.param_groups):
            return  # malformed: Optimizer.load_state_dict refuses it before changing anything
        for gi, (saved, own) in enumerate(zip(groups, self.param_groups)):
            ids = saved.get("params", ()) if isinstance(saved, dict) else ()
            if len(ids) != len(own["params"]):
                return  # likewise refused by torch
            for pi, (pid, p) in enumerate(zip(ids, own["params"])):
                state = states.get(pid)
                if state is None:
                    continue
                layout = p.resu_layout.layout_id if isinstance(p, ResuParameter) else 0
                if not isinstance(state, dict) or state.get("layout_id") != layout:
                    continue  # another slot set: _prepare_state restarts (resizes) it at the next step
                selective = self._selection_for(p, {"selective": saved.get("selective")})
                n = self._n_trainable(p)
                positions = None
                if selective is not None and selective.is_static and p.mode is ResuMode.RESU:
                    positions = p._pruned_indices()
                check_optimizer_state(
                    f"ResuAdamW.load_state_dict: state of parameter {pi} of group {gi}", state,
                    tuple(p.shape) if n is None else n, None, selective=selective, theta_positions=positions,
                )

    # ------------------------------------------------------------------ state
    @staticmethod
    def _n_trainable(p: torch.Tensor) -> Optional[int]:
        """Number of trainable slots of ``p``, or None when every slot is trainable."""
        if not isinstance(p, ResuParameter) or p.mode is ResuMode.DENSE:
            return None
        return p.n_pruned if p.mode.trains_theta else p.numel() - p.n_pruned

    def _prepare_state(self, p: torch.Tensor, n: Optional[int], amsgrad: bool, selection: Optional[tuple] = None) -> dict:
        """The state of ``p``, (re)laid out for its current trainable slots (``selection``: the
        selective layout tag, see :func:`resu.optim.selective.state_layout`)."""
        state = self.state[p]
        layout = p._layout_id if isinstance(p, ResuParameter) else 0
        shape = p.shape if n is None else (n,)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["layout_id"] = layout
            for key in _STATE_KEYS[: 3 if amsgrad else 2]:
                state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        elif state.get("layout_id") != layout or _as_tuple(state.get("selection")) != selection:
            if "layout_id" not in state and state["exp_avg"].shape == shape and selection is None:
                # States without a layout (from torch.optim.AdamW, say) that fit: adopt them.
                state["layout_id"] = layout
            else:
                # New mask, mode or selection: restart the states for the new slot set, in the old storage.
                state["step"].zero_()
                state["layout_id"] = layout
                for key in _STATE_KEYS:
                    if key in state:
                        state[key].resize_(shape).zero_()
                for key in SELECTIVE_KEYS:
                    state.pop(key, None)
        if selection is None:
            state.pop("selection", None)
        else:
            state["selection"] = selection
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
        self._selection_stats.reset()
        self._refuse_selective_amsgrad()
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
            # Weights whose every trainable slot steps (RESU/QRESU θ, SPARSE active slots) are collected
            # and stepped together (one launch per kind on CUDA) unless ``foreach=False`` asks for one at a time;
            # the results are the same either way.
            jobs: Optional[list[StepJob]] = None if group["foreach"] is False or group["amsgrad"] else []
            # Plain CUDA parameters (embeddings, norms, heads) take torch's multi-tensor AdamW under the same
            # rule, instead of about seven launches each.
            plain: Optional[list[torch.Tensor]] = None if jobs is None else []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("ResuAdamW does not support sparse gradients")
                selective = self._selection_for(p, group)
                if selective is not None:
                    self._step_selective(p, group["amsgrad"], selective, hyper)
                elif jobs is not None and (n := self._n_trainable(p)) is not None:
                    jobs.append(self._slot_job(p, amsgrad=False, n=n, grad=grad))
                elif plain is not None and _multi_tensor_ready(p, grad):
                    plain.append(p)
                else:
                    self._step_param(p, group["amsgrad"], hyper)
            if jobs:
                adamw_steps_(jobs, **hyper)
            if plain:
                self._step_plain(plain, group, hyper)
        return loss

    def _step_plain(self, params: list, group: dict, hyper: dict) -> None:
        """torch's multi-tensor AdamW (``foreach``) over plain CUDA parameters: what
        ``torch.optim.AdamW(foreach=True)`` does with them, states in :meth:`_step_param`'s layout (a CPU
        step counter, which torch's fused kernel would refuse: ``fused`` is not used for them)."""
        states = [self._prepare_state(p, None, False) for p in params]
        torch_adamw.adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], foreach=True, fused=None,
            amsgrad=False, beta1=hyper["beta1"], beta2=hyper["beta2"], lr=hyper["lr"],
            weight_decay=hyper["weight_decay"], eps=hyper["eps"], maximize=hyper["maximize"],
        )

    @staticmethod
    def _selection_for(p: torch.Tensor, group: dict) -> Optional[SelectionConfig]:
        """The selective config that applies to ``p``: its group's, else the weight's tag; None for
        weights that do not train θ."""
        if not isinstance(p, ResuParameter) or not p.mode.trains_theta:
            return None
        return group["selective"] if group["selective"] is not None else p.resu_layout.selective

    @staticmethod
    def _slots(p: ResuParameter) -> Target:
        """Where the trainable slots of ``p`` live: QRESU's θ vector, or masked slots of its dense weight."""
        if p.mode is ResuMode.QRESU:
            return p._theta
        return MaskedSlots.theta_of(p) if p.mode is ResuMode.RESU else MaskedSlots.active_of(p)

    def _refuse_selective_amsgrad(self) -> None:
        """Weights tagged selective in an AMSGrad group: refuse before any parameter is stepped."""
        for group in self.param_groups:
            if group["amsgrad"] and any(self._selection_for(p, group) is not None for p in group["params"]):
                raise ValueError(
                    "ResuAdamW: selective updates (a weight tagged by resu.enter_resu_(..., selective=...)) do not "
                    "support `amsgrad`; use amsgrad=False for that group"
                )

    def _step_selective(self, p: ResuParameter, amsgrad: bool, config: SelectionConfig, hyper: dict) -> None:
        tag, n_states = state_layout(config, p.n_pruned)
        state = self._prepare_state(p, n_states, amsgrad, selection=tag)
        grad = p.grad
        values = grad.values if isinstance(grad, CompactGrad) else p._gather_pruned(grad)
        selective_step_(self._slots(p), values, state, config, hyper, self._selection_stats,
                        shard=shard_selection_of(self, p))

    def _step_param(self, p: torch.Tensor, amsgrad: bool, hyper: dict) -> None:
        n = self._n_trainable(p)
        if n is not None:
            job = self._slot_job(p, amsgrad, n)
            max_sq = self.state[p].get("max_exp_avg_sq") if amsgrad else None
            adamw_step_(job.target, job.grad, job.exp_avg, job.exp_avg_sq, job.step, max_exp_avg_sq=max_sq, **hyper)
            return
        state = self._prepare_state(p, n, amsgrad)
        state["step"] += 1
        step = int(state["step"].item())
        max_sq = state.get("max_exp_avg_sq") if amsgrad else None
        target = p._weight if isinstance(p, ResuParameter) else p
        grad = p.grad
        if isinstance(grad, CompactGrad):
            grad = grad.to_dense()
        adamw_update_(target, grad, state["exp_avg"], state["exp_avg_sq"], max_sq, step, **hyper)

    def _slot_job(self, p: ResuParameter, amsgrad: bool, n: Optional[int] = None, grad=None) -> StepJob:
        """Advance the step of a weight with a subset of trainable slots and say what to step: a compact
        gradient is used as is; a dense one is gathered for a compact target (QRESU's θ) and read in
        place by masked slots of a dense weight."""
        state = self._prepare_state(p, self._n_trainable(p) if n is None else n, amsgrad)
        state["step"] += 1
        target = self._slots(p)
        grad = p.grad if grad is None else grad
        if isinstance(grad, CompactGrad):
            grad = grad.values
        elif not isinstance(target, MaskedSlots):
            grad = p._gather_pruned(grad)
        return StepJob(target, grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()))


def _multi_tensor_ready(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``p`` can join torch's multi-tensor AdamW: a plain fp32/bf16/fp16 CUDA tensor (not a
    ResuParameter) with a plain dense gradient of its own dtype."""
    return (
        p.is_cuda and type(p) in (torch.Tensor, torch.nn.Parameter) and type(grad) is torch.Tensor
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16) and grad.dtype == p.dtype
    )


def _check_selective(selective: Any, amsgrad: bool) -> None:
    if selective is not None and not isinstance(selective, SelectionConfig):
        raise ValueError(
            f"ResuAdamW: `selective` must be a resu.core.selective.SelectionConfig or None, got {type(selective).__name__}"
        )
    if selective is not None and amsgrad:
        raise ValueError("ResuAdamW: `selective` updates do not support `amsgrad`; use amsgrad=False")


def _as_tuple(tag: Any) -> Optional[tuple]:
    # torch.save/load may hand a saved tuple back as a list.
    return tuple(tag) if isinstance(tag, (tuple, list)) else tag
