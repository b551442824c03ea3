"""Argument checks shared by the model-level API, with messages that name the argument and the fix."""

from __future__ import annotations

import math
import numbers
from typing import Optional


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


def check_int(value, name: str, caller: str, *, minimum: Optional[int] = None, choices: Optional[tuple] = None) -> int:
    """``value`` if it is an int (not a bool, not a float such as ``4.0``) and ``>= minimum`` / one of
    ``choices``; a ValueError naming ``name`` otherwise."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and choices is not None and value not in choices:
        ok = False
    if not ok:
        if choices is not None:
            expected = " or ".join(map(str, choices))
        else:
            expected = f">= {minimum}" if minimum is not None else "any integer"
        raise ValueError(f"{caller}: `{name}` must be an int ({expected}), got {value!r}")
    return int(value)


def check_generator(generator, caller: str) -> None:
    """A ValueError unless ``generator`` is None or a ``torch.Generator``."""
    import torch

    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{caller}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")


def exit_function(mode) -> str:
    """The function that ends ``mode``'s θ phase: ``"exit_qresu_"`` or ``"exit_resu_"``."""
    return "exit_qresu_" if mode.name == "QRESU" else "exit_resu_"


def refuse_theta_phase(name: str, p, caller: str, when: str) -> None:
    """A ValueError when ``p`` (called ``name``) is in a θ phase (RESU/QRESU), naming the exit call."""
    if p.mode.trains_theta:
        raise ValueError(f"{caller}: `{name}` is in {p.mode.name} mode; call resu.{exit_function(p.mode)}(model) {when}")
