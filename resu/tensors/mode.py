"""The modes a :class:`~resu.tensors.resu_parameter.ResuParameter` can be in."""

from __future__ import annotations

import enum


class ResuMode(str, enum.Enum):
    """Which slots of a weight exist and which are trainable.

    - ``DENSE``: a plain weight; every slot is trainable.
    - ``SPARSE``: pruned slots hold exactly zero; only active slots are trainable.
    - ``RESU``: active slots are frozen; pruned slots hold the trainable resurrection values θ.
    """

    DENSE = "dense"
    SPARSE = "sparse"
    RESU = "resu"

    @property
    def has_mask(self) -> bool:
        return self is not ResuMode.DENSE
