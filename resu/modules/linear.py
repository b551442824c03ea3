"""``RESULinear``: the seed API's layer, a plain ``nn.Linear`` whose weight is a ResuParameter.

A thin layer over the core: every method calls the model-level functions (:func:`resu.prune_`,
:func:`resu.enter_resu_`, :func:`resu.enter_qresu_`, ...) on the layer itself, so a RESULinear and a
sparsified ``nn.Linear`` behave the same. What the layer adds is what seed 000 documents on top:

- ``_mode`` (a :class:`RESUMode`), ``_mask`` (a SparseMask), ``_theta`` and the quantized storage;
- activation capture for Wanda (``_capture_activations`` / ``_activation_norms``);
- stock ``torch.optim`` optimizers on θ (hooks in :mod:`resu.modules.hooks`), and a QRESU-Selective
  mode whose θ steps itself during ``backward()``.

Example::

    layer = RESULinear(512, 256)
    layer.prune_by_magnitude(0.5)
    layer.enter_resu_mode(epsilon=0.1)
    opt = torch.optim.Adam([layer.weight], lr=1e-4)   # trains θ; active weights stay bitwise frozen
    ...
    layer.exit_resu_mode(commit=True)
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn as nn

from resu.api.prune import prune_
from resu.api.qresu_phase import enter_qresu_, exit_qresu_
from resu.api.resu_phase import enter_resu_, exit_resu_
from resu.api.sparsify import sparsify_
from resu.api.validation import check_fraction
from resu.optim.selection_config import SelectionConfig
from resu.modules.hooks import densify_theta_grad, drop_stale_weight_grad, selective_step_hook, share_grad_with_theta
from resu.modules.mode import RESUMode
from resu.optim.resu_adamw import ResuAdamW
from resu.prune.scores import wanda_scores
from resu.prune.select import lowest_scores
from resu.tensors.layout import WritePolicy
from resu.tensors.mask import SparseMask
from resu.tensors.mode import ResuMode

__all__ = ["RESULinear", "RESUMode"]

_PRUNE_FIRST = "call layer.prune_by_magnitude(sparsity) or layer.prune_by_wanda(...) first"


def _qresu_inner(name: str, doc: str) -> property:
    """A read-only layer property: the weight's inner tensor ``name`` in QRESU mode, else None."""
    return property(lambda self: getattr(self.weight, name) if self.weight.mode is ResuMode.QRESU else None, doc=doc)


class RESULinear(nn.Linear):
    """Drop-in ``nn.Linear`` with RESU / QRESU support (seed 000's ``resu.modules.linear.RESULinear``).

    Same constructor and forward as ``nn.Linear`` (``isinstance(layer, nn.Linear)`` holds); its
    ``weight`` is a :class:`~resu.tensors.resu_parameter.ResuParameter` in DENSE mode. The layer moves
    through SPARSE (``prune_by_*``), RESU (``enter_resu_mode``), QRESU (``enter_qresu_mode``) and
    QRESU-Selective (``enter_qresu_selective_mode``) and back (``exit_resu_mode`` / ``exit_qresu_mode``).

    Attributes:
        _capture_activations: while True, every forward adds its inputs' per-feature squared norms
            to the running Wanda statistics read by :attr:`_activation_norms`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        sparsify_(self)
        self._capture_activations = False
        # Running Σx² per input feature (fp32); a buffer so .to()/.cuda() move it, not saved in state_dict.
        self.register_buffer("_activation_sumsq", None, persistent=False)
        self._phase_hooks: list = []  # handles of the hooks of the current RESU/QRESU phase
        self._selective_optimizer: Optional[ResuAdamW] = None

    # ------------------------------------------------------------------ state accessors
    @property
    def _mode(self) -> RESUMode:
        """The layer's :class:`RESUMode` (the weight's mode; QRESU_SELECTIVE when a selective config is attached)."""
        return RESUMode.of(self.weight.mode, self.weight.resu_layout.selective)

    @property
    def _mask(self) -> Optional[SparseMask]:
        """The weight's :class:`~resu.core.mask.SparseMask` (read-only view), None while DENSE."""
        return self.weight.mask

    # QRESU storage of the weight under the seed API's names; None in the other modes.
    _theta = _qresu_inner(
        "_theta",
        "QRESU: the flat θ vector itself (``(n_pruned,)``, ascending pruned-slot order), trainable by "
        "``torch.optim.Adam([layer._theta])`` in QRESU mode. None in the other modes (in RESU mode θ lives "
        "in the pruned slots of ``weight``).",
    )
    _W_A_quantized = _qresu_inner(
        "_qdata", "QRESU: the frozen active weights' codes (uint8, flat; packed two per byte at 4 bits), else None."
    )
    _qscale = _qresu_inner("_qscale", "QRESU: the quantization scales (shape set by the scheme), else None.")
    _qzero = _qresu_inner("_qzero", "QRESU: the quantization zero points (shape of the scales), else None.")

    @property
    def _activation_norms(self) -> Optional[torch.Tensor]:
        """Wanda's ‖X_j‖₂ (shape ``[in_features]``, fp32): the square root of the sum of squares of input
        feature j over every token seen while ``_capture_activations`` was True; None before any capture.
        Assign None to start a new capture."""
        sumsq = self._activation_sumsq
        return None if sumsq is None else sumsq.sqrt()

    @_activation_norms.setter
    def _activation_norms(self, value) -> None:
        if value is not None:
            raise ValueError("RESULinear: `_activation_norms` can only be reset to None (it is computed from captures)")
        self._activation_sumsq = None

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        if self._capture_activations:
            self._record_activations(input)
        return out

    @torch.no_grad()
    def _record_activations(self, x: torch.Tensor) -> None:
        # The same statistic as resu.prune_(method="wanda") collects (resu/prune/calibration.py).
        sumsq = x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0)
        self._activation_sumsq = sumsq if self._activation_sumsq is None else self._activation_sumsq + sumsq

    def extra_repr(self) -> str:
        extra = f", mode={self._mode.value}"
        if self.weight.mode.has_mask:
            extra += f", sparsity={self.weight.sparsity:.3f}"
        return super().extra_repr() + extra

    # ------------------------------------------------------------------ pruning
    def prune_by_magnitude(self, sparsity: float, global_pruning: bool = False) -> None:
        """Prune the ``sparsity`` fraction of smallest |W| (per row, or over the whole matrix with
        ``global_pruning=True``); pruned slots become exactly zero and the layer enters SPARSE mode.

        Raises:
            ValueError: ``sparsity`` outside [0, 1], a non-bool ``global_pruning``, or the layer in a
                RESU/QRESU phase. The layer is left unchanged.
        """
        caller = "RESULinear.prune_by_magnitude"
        self._check_can_prune(caller)
        sparsity = check_fraction(sparsity, "sparsity", caller)
        scope = _scope(global_pruning, caller)
        prune_(self, sparsity, method="magnitude", scope=scope)

    @torch.no_grad()
    def prune_by_wanda(self, sparsity: float, activation_norms: torch.Tensor, global_pruning: bool = False) -> None:
        """Prune by the Wanda score |W_ij|·‖X_j‖ (lowest first), per row or globally; enters SPARSE mode.

        Args:
            sparsity: fraction to prune, in [0, 1].
            activation_norms: ‖X_j‖₂ per input feature, shape ``[in_features]``, finite and >= 0 (for
                example ``layer._activation_norms`` after a capture).
            global_pruning: rank the whole matrix at once instead of each output row.

        Raises:
            ValueError: bad ``sparsity``/``activation_norms``/``global_pruning``, or the layer in a
                RESU/QRESU phase. The layer is left unchanged.
        """
        caller = "RESULinear.prune_by_wanda"
        self._check_can_prune(caller)
        sparsity = check_fraction(sparsity, "sparsity", caller)
        scope = _scope(global_pruning, caller)
        norms = self._check_activation_norms(activation_norms, caller)
        weight = self.weight
        pruned = lowest_scores(wanda_scores(weight.effective_weight(), norms), sparsity, scope)
        weight._apply_pruning_(pruned)
        weight.grad = None

    def _check_can_prune(self, caller: str) -> None:
        mode = self.weight.mode
        if mode.trains_theta:
            exit_fn = "exit_qresu_mode" if mode is ResuMode.QRESU else "exit_resu_mode"
            raise ValueError(f"{caller}: the layer is in {self._mode.name} mode; call layer.{exit_fn}() before pruning")

    def _check_activation_norms(self, norms, caller: str) -> torch.Tensor:
        if not isinstance(norms, torch.Tensor) or not torch.is_floating_point(norms):
            raise ValueError(
                f"{caller}: `activation_norms` must be a floating-point tensor of shape [{self.in_features}], "
                f"got {type(norms).__name__ if not isinstance(norms, torch.Tensor) else norms.dtype}; capture it "
                "with layer._capture_activations = True and a forward pass"
            )
        if tuple(norms.shape) != (self.in_features,):
            raise ValueError(
                f"{caller}: `activation_norms` must have shape [{self.in_features}] (in_features), "
                f"got {list(norms.shape)}"
            )
        if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
            raise ValueError(f"{caller}: `activation_norms` must be finite and >= 0 (L2 norms of the inputs)")
        return norms.detach()

    # ------------------------------------------------------------------ RESU
    def enter_resu_mode(
        self, epsilon: float = 0.1, *, generator: Optional[torch.Generator] = None, stock_optimizer: bool = True
    ) -> None:
        """Enter RESU mode: θ ~ N(0, (ε·σ_A)²) in the pruned slots of ``weight``; active weights frozen.

        With ``stock_optimizer=True`` (default) ``weight`` trains with any ``torch.optim`` optimizer
        (``torch.optim.Adam([layer.weight])``, as in seed 000): its gradient is made dense, exactly zero
        at the active slots, and in-place updates are let through with the active slots restored bitwise
        right after each one, so weight decay and momentum never move them. The cost: a dense gradient
        (4 bytes per weight instead of 4·s) and one gather/scatter of the active values per in-place op.
        :class:`resu.ResuAdamW` works either way; with ``stock_optimizer=False`` the gradient stays a
        compact :class:`~resu.tensors.compact_grad.CompactGrad` and stock optimizers are refused.

        Raises:
            ValueError: a bad ``epsilon``, or the layer not in SPARSE mode (prune first; exit a phase first).
        """
        self._check_can_enter("enter_resu_mode")
        if not isinstance(stock_optimizer, bool):
            raise ValueError(f"RESULinear.enter_resu_mode: `stock_optimizer` must be True or False, got {stock_optimizer!r}")
        enter_resu_(self, epsilon, generator=generator)
        if stock_optimizer:
            self.weight.set_write_policy(WritePolicy.RESTORE_ACTIVE)
            self._add_phase_hook(densify_theta_grad)

    def exit_resu_mode(self, commit: bool = True) -> None:
        """Leave RESU mode: ``commit=True`` keeps θ in the weight (DENSE mode, mask dropped); ``commit=False``
        zeroes the pruned slots again (SPARSE mode). The phase's hooks are removed."""
        self._leave_phase(ResuMode.RESU, commit, exit_resu_)

    # ------------------------------------------------------------------ QRESU
    def enter_qresu_mode(
        self,
        bits: int = 4,
        epsilon: float = 0.1,
        qscheme: str = "per_channel",
        group_size: int = 128,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """Enter QRESU mode: quantize the frozen active weights, θ becomes the flat vector ``layer._theta``.

        Args:
            bits: 4 or 8.
            epsilon: θ initialisation scale (θ ~ N(0, (ε·σ_A)²)).
            qscheme: ``"per_channel"``, ``"per_tensor"`` or ``"per_group"``.
            group_size: columns per scale with ``"per_group"``.
            generator: random generator for θ.

        Train θ with a stock optimizer on ``layer._theta`` (``torch.optim.Adam([layer._theta])``): hooks
        make ``layer._theta.grad`` the θ gradient (the weight's compact gradient values, no copy), and
        drop a stale weight gradient when ``_theta.grad`` was cleared. ``resu.ResuAdamW([layer.weight])``
        works too.

        Raises:
            ValueError: bad ``bits``/``qscheme``/``group_size``/``epsilon``, or the layer not in SPARSE mode.
        """
        self._check_can_enter("enter_qresu_mode")
        enter_qresu_(self, bits, qscheme, group_size, epsilon, generator=generator)
        self.weight._theta.requires_grad_(True)  # a trainable leaf for stock optimizers; .grad set by the hook
        self._phase_hooks.append(self.weight.register_hook(drop_stale_weight_grad(self.weight)))
        self._add_phase_hook(share_grad_with_theta)

    def enter_qresu_selective_mode(
        self,
        bits: int = 4,
        epsilon: float = 0.1,
        qscheme: str = "per_channel",
        selective_config: Optional[SelectionConfig] = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        group_size: int = 128,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """Enter QRESU mode with RESU-Selective updates of θ that need no optimizer.

        The layer keeps its own :class:`resu.ResuAdamW` (``lr``, ``weight_decay``, ``selective_config``,
        default ``SelectionConfig()``) and a hook that steps it as soon as ``backward()`` has produced the
        weight's gradient, then clears that gradient: only the selected θ coordinates move (about
        ``k_select_ratio`` of them per step). Its EMA states cost about 2–3× θ's memory.

        Raises:
            ValueError: a bad argument (``selective_config`` not a SelectionConfig, negative ``lr`` or
                ``weight_decay``, bad quantization format), or the layer not in SPARSE mode.
        """
        caller = "RESULinear.enter_qresu_selective_mode"
        self._check_can_enter("enter_qresu_selective_mode")
        if selective_config is not None and not isinstance(selective_config, SelectionConfig):
            raise ValueError(
                f"{caller}: `selective_config` must be a resu.core.selective.SelectionConfig or None, "
                f"got {type(selective_config).__name__}"
            )
        config = selective_config if selective_config is not None else SelectionConfig()
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{caller}: `{name}` must be a finite number >= 0, got {value!r}")
        optimizer = ResuAdamW([self.weight], lr=lr, weight_decay=weight_decay, selective=config)
        enter_qresu_(self, bits, qscheme, group_size, epsilon, generator=generator, selective=config)
        self._selective_optimizer = optimizer
        self._add_phase_hook(selective_step_hook(optimizer))

    def exit_qresu_mode(self, commit: bool = True) -> None:
        """Leave QRESU / QRESU-Selective mode: dequantize the active weights into a dense weight with θ merged
        (``commit=True``, DENSE mode) or zeroed (``commit=False``, SPARSE mode). Hooks and the selective
        optimizer are dropped."""
        self._leave_phase(ResuMode.QRESU, commit, exit_qresu_)

    # ------------------------------------------------------------------ phase bookkeeping
    def _leave_phase(self, mode: ResuMode, commit: bool, exit_fn) -> None:
        """``exit_resu_mode`` / ``exit_qresu_mode``: check the layer is in ``mode``, drop the phase's hooks, exit."""
        name, other = ("resu", "qresu") if mode is ResuMode.RESU else ("qresu", "resu")
        caller = f"RESULinear.exit_{name}_mode"
        _check_commit(commit, caller)
        if self.weight.mode is not mode:
            in_other = self.weight.mode is ResuMode(other)
            hint = f"use layer.exit_{other}_mode()" if in_other else f"call layer.enter_{name}_mode() first"
            raise ValueError(f"{caller}: the layer is in {self._mode.name} mode, not {mode.name}; {hint}")
        self._end_phase()
        exit_fn(self, commit=commit)

    def _check_can_enter(self, method: str) -> None:
        mode = self.weight.mode
        if mode is ResuMode.DENSE:
            raise ValueError(f"RESULinear.{method}: the layer has no mask yet; {_PRUNE_FIRST}")
        if mode.trains_theta:
            exit_fn = "exit_qresu_mode" if mode is ResuMode.QRESU else "exit_resu_mode"
            raise ValueError(f"RESULinear.{method}: the layer is already in {self._mode.name} mode; call layer.{exit_fn}() first")

    def _add_phase_hook(self, hook) -> None:
        self._phase_hooks.append(self.weight.register_post_accumulate_grad_hook(hook))

    def _end_phase(self) -> None:
        """Remove this phase's hooks, opt-in flag and selective optimizer (before the core's exit)."""
        for handle in self._phase_hooks:
            handle.remove()
        self._phase_hooks = []
        self._selective_optimizer = None
        self.weight.set_write_policy(WritePolicy.REFUSE)
        self.weight.grad = None


def _scope(global_pruning, caller: str) -> str:
    if not isinstance(global_pruning, bool):
        raise ValueError(f"{caller}: `global_pruning` must be True or False, got {global_pruning!r}")
    return "global" if global_pruning else "row"


def _check_commit(commit, caller: str) -> None:
    if not isinstance(commit, bool):
        raise ValueError(f"{caller}: `commit` must be True or False, got {commit!r}")
