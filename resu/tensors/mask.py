"""``SparseMask``: the pruning mask of one weight, in the smallest of three encodings.

The encodings and the kernels over a raw ``(storage, encoding, numel, n_pruned)`` quadruple live in
:mod:`resu.tensors.mask_kernels` (re-exported here, so ``resu.tensors.mask.gather_pruned`` and friends
keep working); this module is the mask-level API on top of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from resu.tensors.mask_checks import _check_numel, _check_sparsity, _is_int, _normalize_shape
from resu.tensors.mask_kernels import *  # noqa: F401,F403  (the kernel API, under its historical path)
from resu.tensors.mask_kernels import MaskEncoding, _as_encoding, _encode_as, _prep, _validate_contents, choose_encoding
from resu.tensors.mask_kernels import __all__ as _KERNEL_ALL

__all__ = ["MaskStats", "SparseMask", *_KERNEL_ALL]

@dataclasses.dataclass(frozen=True)
class MaskStats:
    """Counts of a mask: ``total`` = ``n_active`` + ``n_pruned``; ``sparsity`` = pruned / total."""

    total: int
    n_active: int
    n_pruned: int
    sparsity: float


_STATE_KEYS = ("shape", "n_pruned", "encoding", "storage")


def _pruned_of_dense(mask: torch.Tensor, name: str) -> torch.Tensor:
    """True at pruned slots of a dense keep-mask (bool, or 0/1 values); a ValueError naming ``name`` otherwise."""
    if mask.dtype == torch.bool:
        return ~mask
    pruned = mask == 0
    if mask.numel() and not bool((pruned | (mask == 1)).all()):
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")
    return pruned


class SparseMask:
    """Pruning mask of a weight, stored in the smallest of three encodings.

    Args:
        pruned_indices: 1-D integer tensor (or sequence) of the flat, row-major
            indices of the pruned positions, in any order.  They must be unique
            and lie in ``[0, numel)``.
        shape: shape of the weight the mask belongs to.
        device: device of the stored mask (default: that of ``pruned_indices``).
        adaptive: if True (default) store whichever encoding is smallest
            (pruned indices, active indices or bitmap, see
            :func:`choose_encoding`); if False always store pruned indices.

    The mask holds a single storage tensor (see :class:`MaskEncoding`); the
    dense boolean mask is only built on demand by :attr:`mask`.
    """

    __hash__ = None  # mutable through update(); equality compares pruned sets

    def __init__(
        self,
        pruned_indices: torch.Tensor | Sequence[int],
        shape: Sequence[int],
        device: torch.device | str | None = None,
        adaptive: bool = True,
    ) -> None:
        shape_t = _normalize_shape(shape)
        numel = math.prod(shape_t)
        if not isinstance(pruned_indices, torch.Tensor):
            try:
                pruned_indices = torch.as_tensor(pruned_indices)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(
                    f"pruned_indices must be a 1-D integer tensor, got {pruned_indices!r}"
                ) from exc
            if pruned_indices.numel() == 0:
                pruned_indices = pruned_indices.to(torch.int64)
        dtype = pruned_indices.dtype
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            raise ValueError(
                f"pruned_indices must be a 1-D integer tensor, got dtype {pruned_indices.dtype}"
            )
        if pruned_indices.dim() != 1:
            raise ValueError(
                f"pruned_indices must be 1-D, got shape {tuple(pruned_indices.shape)}"
            )
        target = torch.device(device) if device is not None else pruned_indices.device
        idx = pruned_indices.to(device=target, dtype=torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel:
                raise ValueError(
                    f"pruned_indices must lie in [0, {numel}) for shape {shape_t}, "
                    f"got values in [{lo}, {hi}]"
                )
        flags = torch.zeros(numel, dtype=torch.bool, device=target)
        flags[idx] = True
        n_pruned = int(flags.sum())
        if n_pruned != idx.numel():
            raise ValueError(
                f"pruned_indices must be unique, got {idx.numel() - n_pruned} duplicate(s)"
            )
        if adaptive:
            enc = choose_encoding(numel, n_pruned)
        else:
            enc = MaskEncoding.PRUNED_INDICES
        self._set(_encode_as(flags, enc), enc, shape_t, n_pruned)
        self._adaptive = bool(adaptive)

    # ---------------------------------------------------------------- internals

    def _set(
        self, storage: torch.Tensor, encoding: MaskEncoding, shape: tuple[int, ...], n_pruned: int
    ) -> None:
        self._storage = storage
        self._encoding = encoding
        self._shape = shape
        self._numel = math.prod(shape)
        self._n_pruned = n_pruned

    @classmethod
    def _from_pruned_bool(
        cls, pruned: torch.Tensor, shape: tuple[int, ...], adaptive: bool = True
    ) -> SparseMask:
        flat = pruned.reshape(-1)
        n_pruned = int(flat.sum())
        numel = flat.numel()
        enc = choose_encoding(numel, n_pruned) if adaptive else MaskEncoding.PRUNED_INDICES
        obj = cls.__new__(cls)
        obj._set(_encode_as(flat, enc), enc, shape, n_pruned)
        obj._adaptive = adaptive
        return obj

    def _args(
        self, device: torch.device | None = None
    ) -> tuple[torch.Tensor, MaskEncoding, int, int]:
        storage = self._storage
        if device is not None and storage.device != device:
            storage = storage.to(device)
        return storage, self._encoding, self._numel, self._n_pruned

    def _check_tensor(self, t: Any, name: str = "t") -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != self._shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the mask has shape {self._shape}"
            )
        return t

    # ---------------------------------------------------------------- factories

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor) -> SparseMask:
        """Build from a dense bool or 0/1 tensor where True/1 marks an ACTIVE position.

        The mask's shape becomes the shape, its device the device.
        """
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
        _check_numel(mask.numel(), f"shape {tuple(mask.shape)}")
        return cls._from_pruned_bool(_pruned_of_dense(mask, "mask"), tuple(mask.shape))

    @classmethod
    def from_magnitude(
        cls, weights: torch.Tensor, sparsity: float, global_pruning: bool = True
    ) -> SparseMask:
        """Prune the smallest-magnitude weights.

        With ``global_pruning=True`` the ``round(sparsity * numel)`` smallest
        ``|w|`` over the whole tensor are pruned; otherwise
        ``round(sparsity * cols)`` in every row, where rows run along the last
        dimension.  Ties are broken deterministically: among equal magnitudes
        the lower flat index is pruned first.  NaN magnitudes count as the
        largest.  ``round`` is Python's (halves go to the even integer).
        """
        if not isinstance(weights, torch.Tensor):
            raise ValueError(f"weights must be a tensor, got {type(weights).__name__}")
        s = _check_sparsity(sparsity)
        shape = tuple(weights.shape)
        _check_numel(weights.numel(), f"shape {shape}")
        numel = weights.numel()
        mag = weights.detach().abs()
        pruned = torch.zeros(numel, dtype=torch.bool, device=weights.device)
        if numel:
            if global_pruning:
                k = round(s * numel)
                order = torch.sort(mag.reshape(-1), stable=True).indices
                pruned[order[:k]] = True
            else:
                cols = shape[-1] if shape else 1
                k = round(s * cols)
                rows = mag.reshape(-1, cols)
                order = torch.sort(rows, dim=1, stable=True).indices[:, :k]
                pruned.view(-1, cols).scatter_(1, order, True)
        return cls._from_pruned_bool(pruned, shape)

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        sparsity: float,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> SparseMask:
        """A uniformly random mask with exactly ``round(sparsity * numel)`` pruned positions.

        The permutation is drawn on ``generator``'s device (default ``device``)
        and the mask is stored on ``device`` (default CPU, or the generator's).
        """
        shape_t = _normalize_shape(shape)
        s = _check_sparsity(sparsity)
        numel = math.prod(shape_t)
        k = round(s * numel)
        if generator is not None:
            perm = torch.randperm(numel, generator=generator, device=generator.device)
        else:
            perm = torch.randperm(numel, device=device)
        target = torch.device(device) if device is not None else perm.device
        pruned = torch.zeros(numel, dtype=torch.bool, device=target)
        pruned[perm[:k].to(target)] = True
        return cls._from_pruned_bool(pruned, shape_t)

    @classmethod
    def from_storage(
        cls,
        storage: torch.Tensor,
        encoding: MaskEncoding | str,
        shape: Sequence[int],
        n_pruned: int,
        *,
        validate: bool = False,
    ) -> SparseMask:
        """Wrap an existing storage tensor (no copy).

        Dtype and length are always checked against ``encoding``, ``shape`` and
        ``n_pruned``; the contents (sortedness, range, bit count) only when
        ``validate=True``.
        """
        shape_t = _normalize_shape(shape)
        numel = math.prod(shape_t)
        enc = _as_encoding(encoding)
        if not _is_int(n_pruned) or not 0 <= n_pruned <= numel:
            raise ValueError(f"n_pruned must be an int in [0, {numel}], got {n_pruned!r}")
        if not isinstance(storage, torch.Tensor):
            raise ValueError(f"storage must be a tensor, got {type(storage).__name__}")
        try:
            _prep(storage, enc, numel, n_pruned)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith("storage") else f"storage: {msg}") from None
        if validate:
            _validate_contents(storage, enc, numel, n_pruned)
        obj = cls.__new__(cls)
        obj._set(storage, enc, shape_t, n_pruned)
        obj._adaptive = True
        return obj

    # --------------------------------------------------------------- properties

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight the mask covers."""
        return self._shape

    @property
    def numel(self) -> int:
        """Number of positions, ``prod(shape)``."""
        return self._numel

    @property
    def n_pruned(self) -> int:
        """Number of pruned positions."""
        return self._n_pruned

    @property
    def n_active(self) -> int:
        """Number of active positions."""
        return self._numel - self._n_pruned

    @property
    def sparsity(self) -> float:
        """Fraction of pruned positions (0.0 for an empty shape)."""
        return self._n_pruned / self._numel if self._numel else 0.0

    @property
    def device(self) -> torch.device:
        """Device of the storage tensor."""
        return self._storage.device

    @property
    def encoding(self) -> MaskEncoding:
        """Encoding of :attr:`storage`."""
        return self._encoding

    @property
    def storage(self) -> torch.Tensor:
        """The single tensor the mask is stored in (see :class:`MaskEncoding`)."""
        return self._storage

    @property
    def _indices(self) -> torch.Tensor:
        """The stored encoding (seed 000's name for it, used by its memory examples): int32 indices or a bitmap."""
        return self._storage

    @property
    def nbytes(self) -> int:
        """Bytes of :attr:`storage`."""
        return self._storage.numel() * self._storage.element_size()

    @property
    def pruned_indices(self) -> torch.Tensor:
        """int64 flat indices of the pruned positions, ascending."""
        return pruned_flat_indices(*self._args())

    @property
    def active_indices(self) -> torch.Tensor:
        """int64 flat indices of the active positions, ascending."""
        return active_flat_indices(*self._args())

    @property
    def mask(self) -> torch.Tensor:
        """Dense bool tensor of :attr:`shape`, True = ACTIVE.  Built on every access."""
        return (~pruned_bool(*self._args())).reshape(self._shape)

    @property
    def stats(self) -> MaskStats:
        """A :class:`MaskStats` with the counts of this mask."""
        return MaskStats(
            total=self._numel,
            n_active=self.n_active,
            n_pruned=self._n_pruned,
            sparsity=self.sparsity,
        )

    # ------------------------------------------------------------------ methods

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Copy of ``t`` with the pruned positions zeroed; ``t.shape`` must equal :attr:`shape`."""
        t = self._check_tensor(t)
        return zero_pruned(t, *self._args(t.device))

    def apply_inplace(self, t: torch.Tensor) -> torch.Tensor:
        """Zero the pruned positions of ``t`` in place and return ``t``."""
        t = self._check_tensor(t)
        storage, enc, numel, n_pruned = self._args(t.device)
        if enc is MaskEncoding.PRUNED_INDICES and t.is_contiguous():
            zero = torch.zeros((), dtype=t.dtype, device=t.device)
            t.view(-1).index_put_((storage,), zero)
        else:
            t.masked_fill_(pruned_bool(storage, enc, numel, n_pruned).view(self._shape), 0)
        return t

    def get_active(self, t: torch.Tensor) -> torch.Tensor:
        """1-D values of ``t`` at the active positions, ascending flat-index order."""
        t = self._check_tensor(t)
        return gather_active(t, *self._args(t.device))

    def get_pruned(self, t: torch.Tensor) -> torch.Tensor:
        """1-D values of ``t`` at the pruned positions, ascending flat-index order."""
        t = self._check_tensor(t)
        return gather_pruned(t, *self._args(t.device))

    def update(self, new_dense_mask: torch.Tensor, inplace: bool = True) -> SparseMask:
        """Re-encode from a dense ACTIVE mask (bool or 0/1) of the same shape.

        With ``inplace=True`` this mask changes and is returned; otherwise a new
        :class:`SparseMask` is returned and this one is left alone.  The result
        stays on this mask's device.
        """
        if not isinstance(new_dense_mask, torch.Tensor):
            raise ValueError(
                f"new_dense_mask must be a tensor, got {type(new_dense_mask).__name__}"
            )
        if tuple(new_dense_mask.shape) != self._shape:
            raise ValueError(
                f"new_dense_mask has shape {tuple(new_dense_mask.shape)} "
                f"but the mask has shape {self._shape}"
            )
        pruned = _pruned_of_dense(new_dense_mask.to(self.device), "new_dense_mask")
        new = SparseMask._from_pruned_bool(pruned, self._shape, self._adaptive)
        if not inplace:
            return new
        self._set(new._storage, new._encoding, self._shape, new._n_pruned)
        return self

    def to(self, device: torch.device | str) -> SparseMask:
        """Return a mask on ``device`` (a new object; storage copied only if the device differs)."""
        obj = SparseMask.__new__(SparseMask)
        obj._set(self._storage.to(device), self._encoding, self._shape, self._n_pruned)
        obj._adaptive = self._adaptive
        return obj

    def state_dict(self) -> dict[str, Any]:
        """Plain dict (shape tuple, ints, a string, one tensor); loads with ``weights_only=True``."""
        return {
            "shape": tuple(self._shape),
            "n_pruned": int(self._n_pruned),
            "encoding": self._encoding.value,
            "storage": self._storage,
        }

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> SparseMask:
        """Rebuild a mask from :meth:`state_dict` output, validating keys and contents."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        for key in _STATE_KEYS:
            if key not in state_dict:
                raise ValueError(f"state_dict is missing key {key!r}")
        n_pruned = state_dict["n_pruned"]
        if isinstance(n_pruned, torch.Tensor) and n_pruned.numel() == 1:
            if not n_pruned.is_floating_point():
                n_pruned = int(n_pruned)
        return cls.from_storage(
            state_dict["storage"],
            state_dict["encoding"],
            state_dict["shape"],
            n_pruned,
            validate=True,
        )

    # ----------------------------------------------------------------- dunders

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseMask):
            return NotImplemented
        if self._shape != other._shape or self._n_pruned != other._n_pruned:
            return False
        if self._encoding is other._encoding and self.device == other.device:
            # All three encodings are canonical (sorted indices, zero padding).
            return torch.equal(self._storage, other._storage)
        mine = pruned_bool(*self._args())
        theirs = pruned_bool(*other._args(self.device))
        return torch.equal(mine, theirs)

    def __repr__(self) -> str:
        return (
            f"SparseMask(shape={self._shape}, n_pruned={self._n_pruned}, "
            f"sparsity={self.sparsity:.4f}, encoding={self._encoding.value!r}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )
