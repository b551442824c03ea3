"""The modes a :class:`~resu.tensors.resu_parameter.ResuParameter` can be in."""

from __future__ import annotations

import enum


class ResuMode(str, enum.Enum):
    """Which slots of a weight exist and which are trainable.

    - ``DENSE``: a plain weight; every slot is trainable.
    - ``SPARSE``: pruned slots hold exactly zero; only active slots are trainable.
    - ``RESU``: active slots are frozen; pruned slots hold the trainable resurrection values θ.
    - ``QRESU``: active slots are frozen and stored quantized (packed 4-bit or 8-bit codes with
      scales); θ is a flat fp32 vector of the pruned slots' values; there is no dense weight.
    """

    DENSE = "dense"
    SPARSE = "sparse"
    RESU = "resu"
    QRESU = "qresu"

    @property
    def has_mask(self) -> bool:
        return self is not ResuMode.DENSE

    @property
    def trains_theta(self) -> bool:
        """True when only the pruned slots' values θ are trainable (RESU and QRESU)."""
        return self in (ResuMode.RESU, ResuMode.QRESU)
