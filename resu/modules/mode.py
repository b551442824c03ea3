"""``RESUMode``: the operating mode of a :class:`~resu.modules.linear.RESULinear`, as the seed API names it."""

from __future__ import annotations

import enum
from typing import Optional

from resu.tensors.mode import ResuMode


class RESUMode(str, enum.Enum):
    """What a ``RESULinear`` layer's forward and training do: the seed API's name for the mode.

    The library has one mode enum, :class:`resu.ResuMode` (a weight's mode); this is its view at the
    layer level, a separate enum only because the seed API adds a fifth member (an ``Enum`` with
    members cannot be subclassed). The first four are :class:`resu.ResuMode`'s values (the same
    strings, so ``RESUMode.RESU == resu.ResuMode.RESU``); ``QRESU_SELECTIVE`` is QRESU with a
    :class:`~resu.optim.selection_config.SelectionConfig` attached to the weight.

    - ``DENSE``: standard forward, no mask.
    - ``SPARSE``: pruned slots are exactly zero; active slots train.
    - ``RESU``: active slots frozen; θ trains in the pruned slots of the dense weight.
    - ``QRESU``: active slots frozen and quantized (4/8-bit); θ is a flat fp32 vector.
    - ``QRESU_SELECTIVE``: QRESU whose θ updates are filtered by gradient consistency.
    """

    DENSE = "dense"
    SPARSE = "sparse"
    RESU = "resu"
    QRESU = "qresu"
    QRESU_SELECTIVE = "qresu_selective"

    @classmethod
    def of(cls, weight_mode: ResuMode, selective: Optional[object] = None) -> "RESUMode":
        """The layer mode for a weight in ``weight_mode`` with selective config ``selective`` (or None)."""
        if weight_mode is ResuMode.QRESU and selective is not None:
            return cls.QRESU_SELECTIVE
        return cls(ResuMode(weight_mode).value)
