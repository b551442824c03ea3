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
- an LR scheduler object (``torch.optim.lr_scheduler`` wants one optimizer): set ``lr`` in
  :attr:`StepInBackward.param_groups` instead;
- FSDP2 / DDP, whose hooks own the gradients.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional

import torch

from resu.optim.resu_adamw import ResuAdamW
from resu.tensors.foreign_grad import compact_foreign_grad
from resu.tensors.resu_parameter import ResuParameter


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
            seen.add(id(p))
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
            if isinstance(param, ResuParameter):
                # Runs before this hook when registered first; called again so that a dense gradient
                # never reaches the step even if this hook came first (idempotent on a compact one).
                compact_foreign_grad(param)
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
        """Load what :meth:`state_dict` returned for the same parameters (checked before anything loads)."""
        states = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            got = len(states) if isinstance(states, list) else "no"
            raise ValueError(
                f"StepInBackward.load_state_dict: expected {{'optimizers': [...]}} with {len(self.optimizers)} "
                f"entries (one per parameter), got {got}; load a state saved for the same parameters"
            )
        before = [opt.state_dict() for opt in self.optimizers]
        try:
            for opt, state in zip(self.optimizers, states):
                opt.load_state_dict(state)
        except Exception:
            # One entry did not fit its parameter: put back those already loaded (nothing half-changed).
            for opt, state in zip(self.optimizers, before):
                opt.load_state_dict(state)
            raise

    def remove(self) -> None:
        """Take the hooks off: later backward passes accumulate gradients as usual."""
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles = []

    def __del__(self) -> None:
        self.remove()


__all__ = ["StepInBackward"]
