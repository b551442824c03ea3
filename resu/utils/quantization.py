"""Asymmetric affine quantization of weight matrices, as the seed API documents it.

``W ≈ (W_q - zero_point) * scale`` with ``W_q`` unpacked ``uint8`` codes of the weight's shape, and one
``scale``/``zero_point`` (fp32) per tensor, per output channel (row) or per group of ``group_size``
consecutive columns of a row. The rounding error is at most ``scale / 2`` per element (up to float
rounding). QRESU stores the same codes packed two per byte (:mod:`resu.tensors.quantized`).

:func:`quantize` / :func:`dequantize` also take ``scheme="nf4"`` (4-bit NormalFloat codes with one
absmax ``scale`` per ``group_size`` columns, an empty ``zero_point``; ``double_quant=True`` stores the
scales as 8-bit codes, see :mod:`resu.tensors.quantized`).

Example::

    W_q, scale, zero_point = quantize_per_channel(W, bits=4)
    W_hat = dequantize_per_channel(W_q, scale, zero_point)
    W_q, qparams = quantize(W, bits=4, scheme="per_group", group_size=128)
    W_hat = dequantize(W_q, qparams)
    W_q, qparams = quantize(W, bits=4, scheme="nf4", group_size=64, double_quant=True)
"""

from __future__ import annotations

from typing import Optional

import torch

from resu.tensors.quantized import SCHEME_TABLE, QuantFormat, block_params, check_format, dequantize_codes, quantize_codes

__all__ = [
    "quantize",
    "dequantize",
    "quantize_per_channel",
    "dequantize_per_channel",
    "quantize_per_tensor",
    "dequantize_per_tensor",
    "quantize_per_group",
    "dequantize_per_group",
]


def _check_weight(W: torch.Tensor, caller: str) -> None:
    if not isinstance(W, torch.Tensor) or not torch.is_floating_point(W):
        raise ValueError(f"{caller}: `W` must be a floating-point tensor")
    if W.dim() != 2:
        raise ValueError(f"{caller}: `W` must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")


def _quantize(W, bits, scheme, group_size, caller, double_quant=False):
    _check_weight(W, caller)
    check_format(bits, scheme, group_size, caller, double_quant)
    fmt = QuantFormat(bits, scheme, group_size, double_quant)
    scale, zero = block_params(W, fmt)
    return quantize_codes(W, scale, zero, fmt), scale, zero


def _dequantize(W_q, scale, zero, scheme, group_size, caller, double_quant=False):
    if not isinstance(W_q, torch.Tensor) or W_q.dtype != torch.uint8 or W_q.dim() != 2:
        raise ValueError(f"{caller}: `W_q` must be a 2-D uint8 tensor of codes")
    # The widest bit width the scheme takes: reading codes back does not depend on it.
    fmt = QuantFormat(SCHEME_TABLE[scheme].bits[-1], scheme, group_size, double_quant)
    expected = fmt.scale_shape(*W_q.shape), fmt.zero_shape(*W_q.shape)
    if (tuple(scale.shape), tuple(zero.shape)) != expected:
        raise ValueError(
            f"{caller}: `scale` and `zero_point` must have shapes {expected[0]} and {expected[1]} for {scheme} "
            f"codes of shape {tuple(W_q.shape)}, got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    return dequantize_codes(W_q, scale, zero, fmt)


def quantize_per_channel(W: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize with one scale and zero point per output channel.

    Returns ``(W_q, scale, zero_point)``: ``W_q`` uint8 codes shaped like ``W``; ``scale`` and
    ``zero_point`` fp32 of shape ``(out_features,)``.
    """
    return _quantize(W, bits, "per_channel", 128, "quantize_per_channel")


def dequantize_per_channel(W_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """fp32 ``(W_q - zero_point) * scale`` with per-channel parameters."""
    return _dequantize(W_q, scale, zero_point, "per_channel", 128, "dequantize_per_channel")


def quantize_per_tensor(W: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize with one scale and zero point for the whole tensor (0-d ``scale`` and ``zero_point``)."""
    return _quantize(W, bits, "per_tensor", 128, "quantize_per_tensor")


def dequantize_per_tensor(W_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """fp32 ``(W_q - zero_point) * scale`` with per-tensor parameters."""
    return _dequantize(W_q, scale, zero_point, "per_tensor", 128, "dequantize_per_tensor")


def quantize_per_group(
    W: torch.Tensor, bits: int = 4, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize with one scale and zero point per ``group_size`` consecutive columns of each row.

    ``scale`` and ``zero_point`` have shape ``(out_features, ceil(in_features / group_size))``.
    """
    return _quantize(W, bits, "per_group", group_size, "quantize_per_group")


def dequantize_per_group(
    W_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int = 128
) -> torch.Tensor:
    """fp32 ``(W_q - zero_point) * scale`` with per-group parameters."""
    check_format(8, "per_group", group_size, "dequantize_per_group")
    return _dequantize(W_q, scale, zero_point, "per_group", group_size, "dequantize_per_group")


def quantize(
    W: torch.Tensor, bits: int = 4, scheme: str = "per_channel", group_size: int = 128, double_quant: bool = False
) -> tuple[torch.Tensor, dict]:
    """Quantize ``W`` with any scheme. Returns ``(W_q, qparams)``; ``qparams`` holds ``scale``,
    ``zero_point``, ``bits``, ``scheme``, ``group_size`` and ``double_quant`` (everything
    :func:`dequantize` needs). ``double_quant`` applies to ``scheme="nf4"`` only."""
    W_q, scale, zero = _quantize(W, bits, scheme, group_size, "quantize", double_quant)
    qparams = {"scale": scale, "zero_point": zero, "bits": bits, "scheme": scheme, "group_size": group_size,
               "double_quant": double_quant}
    return W_q, qparams


def dequantize(W_q: torch.Tensor, qparams: dict, scheme: Optional[str] = None) -> torch.Tensor:
    """Inverse of :func:`quantize`. ``scheme`` defaults to ``qparams["scheme"]`` and must agree with it."""
    stored = qparams.get("scheme", scheme)
    scheme = stored if scheme is None else scheme
    if stored != scheme:
        raise ValueError(f"dequantize: `scheme` {scheme!r} does not match qparams['scheme'] {stored!r}")
    if scheme is None:
        raise ValueError("dequantize: pass `scheme` (qparams has no 'scheme' entry)")
    group_size = qparams.get("group_size", 128)
    double_quant = qparams.get("double_quant", False)
    check_format(qparams.get("bits", 4), scheme, group_size, "dequantize", double_quant)
    return _dequantize(W_q, qparams["scale"], qparams["zero_point"], scheme, group_size, "dequantize", double_quant)
