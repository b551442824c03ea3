"""Argument checks shared by the model-level API, with messages that name the argument and the fix."""

from __future__ import annotations

import math
import numbers


def check_fraction(value, name: str, caller: str) -> float:
    """``value`` as a float in [0, 1], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{caller}: `{name}` must be a number in [0, 1], got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{caller}: `{name}` must be in [0, 1], got {value}")
    return value


def check_choice(value, name: str, choices: tuple[str, ...], caller: str) -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{caller}: unknown `{name}` {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_nonnegative(value, name: str, caller: str) -> float:
    """``value`` as a finite float >= 0, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{caller}: `{name}` must be a finite number >= 0, got {value!r}")
    return float(value)
