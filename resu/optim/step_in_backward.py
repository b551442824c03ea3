"""``StepInBackward``: each parameter stepped as soon as backward has produced its gradient.

In an ordinary step every gradient of the model is alive at once, between ``loss.backward()`` and
``opt.step()``. For a QRESU model that is a large share of the peak: θ's gradient is as large as θ
(fp32), beside codes that take half a byte per weight. Stepping each parameter from a
post-accumulate-grad hook, then dropping its gradient, keeps only the gradients of the layers backward
is working on. The update is the same: each parameter has its own optimizer, built by
``optimizer_factory`` from a one-parameter list, and runs the same step it would run in a shared one.

What this cannot do (one ``backward()`` is one optimizer step):

- gradient accumulation over micro-batches, and gradient clipping by the global norm (no step sees
  every gradient);
- several backward passes over one graph (``retain_graph=True``, two losses): the first one steps the
  weights, and the second would differentiate through weights that have already moved;
- reentrant activation checkpointing (``use_reentrant=True``), whose inner backward passes fire the
  hooks of a weight shared by two checkpointed regions once each: use ``use_reentrant=False``;
- an LR scheduler object (``torch.optim.lr_scheduler`` wants one optimizer): set ``lr`` in
  :attr:`StepInBackward.param_groups` instead;
- DDP or FSDP2: the hook would step on the rank's own gradient before it is reduced. FSDP2's sharded
  parameters (DTensors) are refused; under an initialized process group a warning says so.

RESU-Selective's ``"random"`` strategy draws each weight's subset seed from the global generator at
its first step; backward reaches the weights in the reverse of a shared optimizer's order, so the
subsets differ from a shared optimizer's (each as random). Every other mode and strategy takes the
same step bitwise on the CPU.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from resu.optim.resu_adamw import ResuAdamW


class StepInBackward:
    """Step every parameter in ``params`` inside ``backward()``, as soon as its gradient is accumulated.

    Args:
        params: the parameters to train (leaf tensors with ``requires_grad``, each listed once).
        optimizer_factory: builds one parameter's optimizer from a one-element list; default
            :class:`resu.ResuAdamW` with ``**defaults``.
        **defaults: keyword arguments of the default factory (``lr``, ``weight_decay``, ...).

    A training loop stays as it was: ``loss.backward()`` steps the parameters, and :meth:`step` and
    :meth:`zero_grad` are no-ops kept so that ``opt.step(); opt.zero_grad()`` still reads right. After
    ``backward()`` every gradient of ``params`` is None. :meth:`state_dict` / :meth:`load_state_dict`
    resume bitwise; :meth:`remove` takes the hooks off (gradients then accumulate as usual). Keep this
    object for as long as you train, as you would an optimizer: once it is deleted its hooks are
    removed, and the model, its states and this object are freed together, with no reference cycle.

    Example::

        opt = resu.optim.StepInBackward(model.parameters(), lr=1e-4, weight_decay=0.01)
        for batch in loader:
            loss_fn(model(batch)).backward()   # every parameter has taken its step here
    """

    def __init__(self, params: Iterable[torch.Tensor],
                 optimizer_factory: Optional[Callable[[list], torch.optim.Optimizer]] = None, **defaults) -> None:
        params = list(params)
        if not params:
            raise ValueError("StepInBackward: `params` is empty; pass the parameters to train")
        if any(isinstance(p, dict) for p in params):
            raise ValueError(
                "StepInBackward: `params` takes parameters, not param-group dicts; for per-group settings "
                "pass `optimizer_factory`, which receives each one-parameter list and can choose its settings"
            )
        if optimizer_factory is not None and defaults:
            raise ValueError(
                f"StepInBackward: keyword arguments ({', '.join(sorted(defaults))}) configure the default "
                "ResuAdamW; with `optimizer_factory`, pass them to the optimizer inside the factory instead"
            )
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.requires_grad or p.grad_fn is not None:
                raise ValueError(
                    f"StepInBackward: `params`[{i}] is not a leaf tensor that requires grad; pass the model's "
                    "trainable parameters (e.g. [p for p in model.parameters() if p.requires_grad])"
                )
            if id(p) in seen:
                raise ValueError(f"StepInBackward: `params`[{i}] is listed twice; list each parameter once")
            if isinstance(p, DTensor):
                raise ValueError(
                    f"StepInBackward: `params`[{i}] is a DTensor (sharded by FSDP2): a step inside backward "
                    "would not wait for the gradient's reduce-scatter; train sharded models with resu.ResuAdamW"
                )
            seen.add(id(p))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn(
                "StepInBackward: a process group is initialized; under DDP each parameter would be stepped on "
                "this rank's own gradient before the all-reduce, and the replicas would drift apart. Use "
                "resu.ResuAdamW with DDP.", stacklevel=2,
            )
        if optimizer_factory is None:
            def optimizer_factory(ps):
                return ResuAdamW(ps, **defaults)

        self.params = params
        self.optimizers = [optimizer_factory([p]) for p in params]
        self._handles = [p.register_post_accumulate_grad_hook(self._stepper(opt)) for p, opt in zip(params, self.optimizers)]

    @staticmethod
    def _stepper(opt: torch.optim.Optimizer) -> Callable:
        # The hook holds its optimizer weakly: a strong reference would close a cycle (parameter ->
        # hook -> optimizer -> parameter) that keeps a deleted model's weights and states alive until
        # the cyclic garbage collector happens to run. This object holds the optimizers, and its
        # __del__ takes the hooks off.
        ref = weakref.ref(opt)

        def step_now(param: torch.Tensor) -> None:
            opt = ref()
            if opt is None:
                return
            # The gradient is whatever the weight's own hooks left (compact, or dense for a stock
            # optimizer when the layer asked for one): the step takes it as a shared optimizer would.
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step_now

    @property
    def param_groups(self) -> list[dict]:
        """Every optimizer's param groups, in ``params`` order (change ``lr`` here)."""
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self, closure=None) -> None:
        """No-op: the parameters were stepped during ``backward()``. A closure is refused."""
        if closure is not None:
            raise ValueError("StepInBackward.step: a closure cannot run here; the steps happen inside backward()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: each gradient was dropped right after its step."""

    def state_dict(self) -> dict:
        """``{"optimizers": [each parameter's optimizer state_dict, in params order]}``."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned for the same parameters. The entry count is checked
        first; an entry that does not fit its parameter raises after the entries already loaded are
        put back, so nothing is half-changed."""
        states = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            got = len(states) if isinstance(states, list) else "no"
            raise ValueError(
                f"StepInBackward.load_state_dict: expected {{'optimizers': [...]}} with {len(self.optimizers)} "
                f"entries (one per parameter), got {got}; load a state saved for the same parameters"
            )
        before = [opt.state_dict() for opt in self.optimizers]
        for i, (opt, state) in enumerate(zip(self.optimizers, states)):
            try:
                opt.load_state_dict(state)
            except Exception as exc:
                # Entry i did not fit its parameter: put back those already loaded (nothing half-changed).
                for loaded, old in zip(self.optimizers[:i], before):
                    loaded.load_state_dict(old)
                raise ValueError(
                    f"StepInBackward.load_state_dict: entry {i} does not fit `params`[{i}] (shape "
                    f"{tuple(self.params[i].shape)}): {exc}. Nothing was loaded; load a state saved for the same "
                    "parameters, in the same order"
                ) from exc

    def remove(self) -> None:
        """Take the hooks off: later backward passes accumulate gradients as usual."""
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles = []

    def __del__(self) -> None:
        self.remove()


__all__ = ["StepInBackward"]
