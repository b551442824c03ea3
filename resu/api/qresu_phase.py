"""``enter_qresu_`` / ``exit_qresu_``: a resurrection phase over quantized, frozen active weights."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from resu.api.theta_phase import end_phase, phase_thetas, prepare_phase, start_phase_, weights_in_mode
from resu.api.validation import check_int
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import SCHEME_TABLE, QuantFormat, QuantizedState, check_format, quantize_active
from resu.tensors.resu_parameter import ResuParameter


def enter_qresu_(
    model: nn.Module,
    bits: int = 4,
    scheme: str = "per_channel",
    group_size: Optional[int] = None,
    epsilon: float = 0.1,
    *,
    double_quant: bool = False,
    generator: Optional[torch.Generator] = None,
    selective=None,
    init_from: Optional[Mapping[str, torch.Tensor]] = None,
) -> nn.Module:
    """Start a QRESU phase: quantize the frozen active weights, give the pruned slots a trainable θ, in place.

    For every pruned weight the active values are quantized, range taken over active slots only, and
    stored as packed codes (two per byte at 4 bits): affine schemes keep a scale and a zero point per
    tensor, per output channel or per ``group_size`` columns of a row; ``"nf4"`` stores the index of the
    nearest NormalFloat level (QLoRA) with one absmax scale per ``group_size`` columns of a row; θ becomes a flat vector of the pruned
    slots' values (the weight's dtype), initialised as :func:`resu.enter_resu_` does,
    θ ~ N(0, (ε·σ_A)²); the dense weight is freed. The forward rebuilds the effective weight on the
    fly (``resu::dequant_merge``). Train θ with :class:`resu.ResuAdamW`.

    Args:
        model: a pruned model (every ResuParameter in SPARSE mode, see :func:`resu.prune_`).
        bits: 4 or 8.
        scheme: ``"per_channel"``, ``"per_tensor"``, ``"per_group"`` or ``"nf4"`` (4-bit only).
        group_size: columns per scale for ``"per_group"`` and ``"nf4"`` (a positive int; ignored
            otherwise). None: the scheme's default, 128 (per_group) or 64 (nf4).
        epsilon: θ initialisation scale relative to σ_A, >= 0.
        double_quant: ``"nf4"`` only: store the block scales as 8-bit codes, an fp32 scale and zero
            point per 256 blocks (about 0.125 instead of 0.5 bits per weight at group_size 64).
        generator: random generator for θ.
        selective: a :class:`~resu.core.selective.SelectionConfig` to train θ with RESU-Selective
            (QRESU-Selective), exactly as for :func:`resu.enter_resu_`.
        init_from: dense weights by parameter name (:func:`resu.snapshot_weights` before pruning); θ
            starts from their values in the pruned slots, as for :func:`resu.enter_resu_`.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: bad ``bits``/``scheme``/``group_size``/``epsilon``/``init_from``, or a ResuParameter that is not
            in SPARSE mode. ``bits`` and ``group_size`` must be ints: ``4.0`` is refused. The model is
            left unchanged (also when a step fails midway: the weights already changed are restored).
    """
    check_int(bits, "bits", "enter_qresu_", choices=(4, 8))
    check_format(bits, scheme, 1 if group_size is None else group_size, "enter_qresu_", double_quant)
    if group_size is None:
        group_size = SCHEME_TABLE[scheme].default_group_size
    check_int(group_size, "group_size", "enter_qresu_", minimum=1)
    params, epsilon = prepare_phase(model, epsilon, selective, generator, "enter_qresu_")
    flat = [name for name, p in params if p.dim() < 2]
    if flat:
        # Scales are laid out per row of the 2-D view (rows = shape[0]); a 1-D weight has no rows.
        raise ValueError(
            f"enter_qresu_: QRESU needs weights with at least 2 dimensions (rows × columns); {', '.join(flat)} "
            "is 1-D. Use resu.enter_resu_ for this model, or keep 1-D weights out of resu.sparsify_ (filter_fn)."
        )
    fmt = QuantFormat(bits, scheme, group_size, double_quant)
    thetas = phase_thetas(params, epsilon, generator, init_from, "enter_qresu_")
    states = []
    with torch.no_grad():
        for (_, p), theta in zip(params, thetas):
            weight = p.effective_weight()
            qdata, scale, zero = quantize_active(weight, ~p.active_mask, fmt)
            states.append(QuantizedState(qdata, scale, zero, theta.to(p.dtype), fmt))
    start_phase_(params, states, ResuParameter._enter_qresu_, selective)
    return model


def exit_qresu_(model: nn.Module, commit: bool = True) -> nn.Module:
    """End a QRESU phase, in place: dequantize the active weights into a dense weight again.

    Args:
        model: a model whose ResuParameters are in QRESU mode (others are left as they are).
        commit: True merges θ into the pruned slots and returns to DENSE mode (every slot active);
            False zeroes them and returns to SPARSE mode with the same mask.

    The active weights come back as their dequantized values (quantization error included).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: no ResuParameter of ``model`` is in QRESU mode, or ``commit`` is not a bool.
    """
    for p in weights_in_mode(model, ResuMode.QRESU, commit, "exit_qresu_", "enter_qresu_"):
        p._exit_qresu_(commit)
        end_phase(p)
    return model
