"""``ResuLayout``: every piece of metadata of a :class:`~resu.tensors.resu_parameter.ResuParameter`, in one frozen spec.

A ResuParameter is a handful of inner tensors plus this spec. The spec says which inner tensors exist
(:attr:`ResuLayout.inner_names`, declared once per mode in :data:`INNER_TENSORS`), how to read them
(mask encoding, pruned-slot count, quantization format) and what the training side agreed on for this
weight (RESU-Selective config, what an in-place write does). It is the single metadata item of
``__tensor_flatten__``, so ``torch.compile`` guards on it, and it converts to a JSON-able dict
(:meth:`ResuLayout.to_dict`) for pickling and checkpoint metadata.

Fields that do not change the computation a compiled graph does (``layout_id``, ``selective``,
``write_policy``) are left out of equality and hashing: a new mask with the same pruned count reuses
compiled graphs, as it did before the spec existed.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from typing import Any, Optional

from resu.tensors.mask_kernels import MaskEncoding
from resu.tensors.mode import ResuMode
from resu.tensors.quantized import QuantFormat

#: The inner tensors of a ResuParameter in each mode, by attribute name. The first one carries the
#: outer dtype (the "value" tensor: the weight, or θ in QRESU mode).
INNER_TENSORS: dict[ResuMode, tuple[str, ...]] = {
    ResuMode.DENSE: ("_weight",),
    ResuMode.SPARSE: ("_weight", "_mask_storage"),
    ResuMode.RESU: ("_weight", "_mask_storage"),
    ResuMode.QRESU: ("_theta", "_qdata", "_qscale", "_qzero", "_mask_storage"),
}
ALL_INNER_NAMES = ("_weight", "_theta", "_qdata", "_qscale", "_qzero", "_mask_storage")


class WritePolicy(str, enum.Enum):
    """What an in-place write (a stock optimizer step, ``p.mul_``) does to a RESU-mode weight.

    - ``REFUSE``: raise, since it would move the frozen active weights (the default).
    - ``RESTORE_ACTIVE``: let it write, then put the active slots back bitwise. The seed API's
      :class:`resu.modules.linear.RESULinear` sets this so stock ``torch.optim`` optimizers train θ.
    """

    REFUSE = "refuse"
    RESTORE_ACTIVE = "restore_active"


def new_layout_id() -> int:
    """A fresh random id: optimizer states laid out for another id restart."""
    return secrets.randbits(62)


@dataclasses.dataclass(frozen=True)
class ResuLayout:
    """Mode, mask and quantization metadata of a ResuParameter (see the module docstring).

    Args:
        mode: the :class:`ResuMode`.
        encoding: mask encoding of ``_mask_storage`` (None exactly in DENSE mode).
        n_pruned: pruned-slot count (0 in DENSE mode).
        qformat: quantization format of the frozen active weights (QRESU mode only).
        layout_id: identifies this slot set for optimizer states; a new mask or mode gets a new id.
        selective: the RESU-Selective config a RESU/QRESU phase tagged the weight with, or None.
        write_policy: what in-place writes do in RESU mode (:class:`WritePolicy`).
    """

    mode: ResuMode = ResuMode.DENSE
    encoding: Optional[MaskEncoding] = None
    n_pruned: int = 0
    qformat: Optional[QuantFormat] = None
    layout_id: int = dataclasses.field(default_factory=new_layout_id, compare=False)
    selective: Optional[Any] = dataclasses.field(default=None, compare=False)
    write_policy: WritePolicy = dataclasses.field(default=WritePolicy.REFUSE, compare=False)

    def __post_init__(self) -> None:
        mode = ResuMode(self.mode)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "write_policy", WritePolicy(self.write_policy))
        if mode.has_mask:
            if self.encoding is None:
                raise ValueError(f"ResuLayout: a layout in {mode.value} mode needs a mask `encoding`")
            object.__setattr__(self, "encoding", MaskEncoding(self.encoding))
            object.__setattr__(self, "n_pruned", int(self.n_pruned))
        else:
            object.__setattr__(self, "encoding", None)
            object.__setattr__(self, "n_pruned", 0)
        if (mode is ResuMode.QRESU) != (self.qformat is not None):
            raise ValueError("ResuLayout: `qformat` is given exactly in QRESU mode")

    @property
    def inner_names(self) -> tuple[str, ...]:
        """The inner tensors a ResuParameter with this layout holds (value tensor first)."""
        return INNER_TENSORS[self.mode]

    @property
    def encoding_name(self) -> Optional[str]:
        """The encoding as the string the ``resu::`` ops take (None in DENSE mode)."""
        return None if self.encoding is None else self.encoding.value

    def replace(self, **changes) -> "ResuLayout":
        """A copy with ``changes`` applied (``layout_id`` is kept unless given)."""
        return dataclasses.replace(self, **changes)

    def with_mask(self, mode: ResuMode, encoding=None, n_pruned: int = 0, qformat=None) -> "ResuLayout":
        """The layout after a mode or mask change: a new slot set, so a new ``layout_id``."""
        return dataclasses.replace(
            self, mode=mode, encoding=encoding, n_pruned=n_pruned, qformat=qformat, layout_id=new_layout_id()
        )

    def cache_key(self) -> str:
        """The part of the spec a compiled graph depends on, as a stable string."""
        fmt = "" if self.qformat is None else f",{self.qformat}"
        return f"{self.mode.value},{self.encoding_name or 'none'},{self.n_pruned}{fmt}"

    def __repr__(self) -> str:
        parts = [f"mode={self.mode.value}"]
        if self.encoding is not None:
            parts += [f"mask={self.encoding.value}", f"n_pruned={self.n_pruned}"]
        if self.qformat is not None:
            parts += [f"bits={self.qformat.bits}", f"scheme={self.qformat.scheme}"]
        if self.selective is not None:
            parts.append(f"selective={self.selective.strategy}")
        if self.write_policy is not WritePolicy.REFUSE:
            parts.append(f"write_policy={self.write_policy.value}")
        return f"ResuLayout({', '.join(parts)})"

    # ------------------------------------------------------------------ plain-data form
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: strings, ints, None and nested dicts only (loads with ``weights_only=True``)."""
        fmt = self.qformat
        return {
            "mode": self.mode.value,
            "encoding": self.encoding_name,
            "n_pruned": self.n_pruned,
            "qformat": None if fmt is None else dataclasses.asdict(fmt),
            "layout_id": self.layout_id,
            "selective": None if self.selective is None else self.selective.to_dict(),
            "write_policy": self.write_policy.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResuLayout":
        """Inverse of :meth:`to_dict`."""
        selective = data.get("selective")
        if selective is not None:
            from resu.optim.selection_config import SelectionConfig  # the optimizer side owns the type

            selective = SelectionConfig.from_dict(selective)
        fmt = data.get("qformat")
        return cls(
            mode=ResuMode(data["mode"]),
            encoding=data.get("encoding"),
            n_pruned=data.get("n_pruned", 0),
            qformat=None if fmt is None else QuantFormat(**fmt),
            layout_id=data["layout_id"] if data.get("layout_id") is not None else new_layout_id(),
            selective=selective,
            write_policy=WritePolicy(data.get("write_policy", WritePolicy.REFUSE.value)),
        )


__all__ = ["ALL_INNER_NAMES", "INNER_TENSORS", "ResuLayout", "WritePolicy", "new_layout_id"]
