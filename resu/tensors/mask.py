"""Adaptive encoding of a pruning mask, and trace-friendly kernels over it.

A mask over a weight of shape ``shape`` (``numel`` elements, ``n`` for short)
splits the flat, row-major positions of the weight into *active* and *pruned*
ones; ``p`` positions are pruned.  Vectors holding one value per pruned (or
active) position -- "compact" vectors -- list them in ascending flat-index
order, everywhere in this module.

The mask is stored as exactly one tensor, in one of three encodings:

``PRUNED_INDICES``
    int32 tensor of the ``p`` pruned flat indices, ascending (``4p`` bytes).
``ACTIVE_INDICES``
    int32 tensor of the ``n - p`` active flat indices, ascending
    (``4(n - p)`` bytes).
``BITMAP``
    uint8 tensor of ``ceil(n / 8)`` bytes; bit ``i`` (least significant bit
    first) of byte ``j`` describes flat index ``8j + i``, and a set bit means
    *pruned*.  Padding bits past ``n`` are zero.

:func:`choose_encoding` picks the smallest of the three (ties go to pruned
indices, then active indices, then the bitmap), so a mask costs
``min(4s, 4(1 - s), 1/8)`` bytes per weight at sparsity ``s``.  A dense
boolean mask is never stored.

The kernels (:func:`pruned_bool`, :func:`gather_pruned`, :func:`scatter_active`,
...) take the raw ``(storage, encoding, numel, n_pruned)`` quadruple.  Every
output shape follows from ``numel`` and ``n_pruned`` alone, and no kernel reads
tensor data back to Python, so they can be traced by ``torch.compile`` /
AOTAutograd with fake tensors (``fullgraph=True``): compaction uses
``torch.nonzero_static`` with ``size`` taken from ``n_pruned``.  They are
``O(n)`` in time and memory and never sort; with ``PRUNED_INDICES`` storage,
:func:`gather_pruned` is one ``index_select`` over the int32 storage.

:class:`SparseMask` wraps one storage tensor with the ``shape`` it belongs to
and offers the mask-level API (factories, ``apply``, ``get_pruned``,
``state_dict``, ...).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "MaskEncoding",
    "MaskStats",
    "SparseMask",
    "active_flat_indices",
    "choose_encoding",
    "encode_pruned",
    "gather_active",
    "gather_pruned",
    "pruned_bool",
    "pruned_flat_indices",
    "scatter_active",
    "scatter_pruned",
    "zero_pruned",
]

#: Flat indices are stored as int32, so a mask covers fewer than 2**31 weights.
MAX_NUMEL = 2**31 - 1

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


class MaskEncoding(str, enum.Enum):
    """How the single storage tensor of a mask is laid out."""

    PRUNED_INDICES = "pruned_indices"
    ACTIVE_INDICES = "active_indices"
    BITMAP = "bitmap"


# --------------------------------------------------------------------------
# Sizes and encoding choice
# --------------------------------------------------------------------------


def _bitmap_len(numel: int) -> int:
    return (numel + 7) // 8


def _storage_len(encoding: MaskEncoding, numel: int, n_pruned: int) -> int:
    """Number of elements of the storage tensor of ``encoding``."""
    if encoding is MaskEncoding.PRUNED_INDICES:
        return n_pruned
    if encoding is MaskEncoding.ACTIVE_INDICES:
        return numel - n_pruned
    return _bitmap_len(numel)


def _storage_dtype(encoding: MaskEncoding) -> torch.dtype:
    return torch.uint8 if encoding is MaskEncoding.BITMAP else torch.int32


def _encoding_nbytes(encoding: MaskEncoding, numel: int, n_pruned: int) -> int:
    if encoding is MaskEncoding.BITMAP:
        return _bitmap_len(numel)
    return 4 * _storage_len(encoding, numel, n_pruned)


def _as_encoding(encoding: MaskEncoding | str) -> MaskEncoding:
    if isinstance(encoding, MaskEncoding):
        return encoding
    try:
        return MaskEncoding(encoding)
    except ValueError:
        choices = ", ".join(repr(e.value) for e in MaskEncoding)
        raise ValueError(f"encoding must be one of {choices}, got {encoding!r}") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_numel(numel: int, name: str) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(
            f"{name} has {numel} elements; flat indices are stored as int32, "
            f"so at most {MAX_NUMEL} elements are supported"
        )


def _normalize_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        dims = tuple(shape)
    elif isinstance(shape, int) and not isinstance(shape, bool):
        dims = (shape,)
    elif isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)):
        dims = tuple(shape)
    else:
        raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    out = []
    for d in dims:
        try:
            if isinstance(d, bool):
                raise TypeError
            d = operator.index(d)
        except TypeError:
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}") from None
        if d < 0:
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
        out.append(d)
    shape_t = tuple(out)
    _check_numel(math.prod(shape_t), f"shape {shape_t}")
    return shape_t


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1:
            sparsity = float(sparsity)
        else:
            raise ValueError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    s = float(sparsity)
    if math.isnan(s) or s < 0.0 or s > 1.0:
        raise ValueError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    return s


def choose_encoding(numel: int, n_pruned: int) -> MaskEncoding:
    """Return the smallest encoding for ``n_pruned`` pruned out of ``numel``.

    Sizes are ``4 * n_pruned`` (pruned indices), ``4 * (numel - n_pruned)``
    (active indices) and ``ceil(numel / 8)`` (bitmap) bytes.  Ties prefer
    pruned indices, then active indices, then the bitmap.
    """
    if not _is_int(numel) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if not _is_int(n_pruned) or not 0 <= n_pruned <= numel:
        raise ValueError(f"n_pruned must be an int in [0, numel={numel}], got {n_pruned!r}")
    _check_numel(numel, "numel")
    best = MaskEncoding.PRUNED_INDICES
    best_bytes = _encoding_nbytes(best, numel, n_pruned)
    for enc in (MaskEncoding.ACTIVE_INDICES, MaskEncoding.BITMAP):
        nb = _encoding_nbytes(enc, numel, n_pruned)
        if nb < best_bytes:
            best, best_bytes = enc, nb
    return best


# --------------------------------------------------------------------------
# Encoding (eager, data-dependent: not meant to be traced)
# --------------------------------------------------------------------------


def _check_pruned_bool(pruned: Any, name: str = "pruned") -> torch.Tensor:
    if not isinstance(pruned, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor, got {type(pruned).__name__}")
    if pruned.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {pruned.dtype}")
    _check_numel(pruned.numel(), f"shape {tuple(pruned.shape)}")
    return pruned.reshape(-1)


def _encode_as(pruned: torch.Tensor, encoding: MaskEncoding | str) -> torch.Tensor:
    """Encode the bool tensor ``pruned`` (True = pruned) with a given encoding.

    Returns only the storage tensor, on ``pruned.device``.  Used by
    :func:`encode_pruned` and by tests that need a specific encoding.
    """
    enc = _as_encoding(encoding)
    flat = _check_pruned_bool(pruned)
    if enc is MaskEncoding.PRUNED_INDICES:
        return torch.nonzero(flat).reshape(-1).to(torch.int32)
    if enc is MaskEncoding.ACTIVE_INDICES:
        return torch.nonzero(~flat).reshape(-1).to(torch.int32)
    n = flat.numel()
    nb = _bitmap_len(n)
    bits = torch.zeros(nb * 8, dtype=torch.int32, device=flat.device)
    bits[:n] = flat.to(torch.int32)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=flat.device)
    return (bits.view(nb, 8) * weights).sum(dim=1).to(torch.uint8)


def encode_pruned(pruned: torch.Tensor) -> tuple[torch.Tensor, MaskEncoding]:
    """Encode a bool tensor of any shape (True = pruned) with the smallest encoding.

    Returns ``(storage, encoding)``; ``storage`` lives on ``pruned.device``.
    """
    flat = _check_pruned_bool(pruned)
    n_pruned = int(flat.sum())
    enc = choose_encoding(flat.numel(), n_pruned)
    return _encode_as(flat, enc), enc


# --------------------------------------------------------------------------
# Trace-friendly kernels
# --------------------------------------------------------------------------


def _prep(
    storage: torch.Tensor, encoding: MaskEncoding | str, numel: int, n_pruned: int
) -> MaskEncoding:
    """Normalise ``encoding`` and check the storage's metadata (never its data)."""
    enc = _as_encoding(encoding)
    expected = _storage_len(enc, numel, n_pruned)
    if storage.dim() != 1 or storage.shape[0] != expected:
        raise ValueError(
            f"storage for encoding {enc.value!r} with numel={numel}, n_pruned={n_pruned} "
            f"must be 1-D with {expected} elements, got shape {tuple(storage.shape)}"
        )
    if storage.dtype != _storage_dtype(enc):
        raise ValueError(
            f"storage for encoding {enc.value!r} must have dtype {_storage_dtype(enc)}, "
            f"got {storage.dtype}"
        )
    return enc


def _flat_view(flat_values: torch.Tensor, numel: int) -> torch.Tensor:
    if flat_values.numel() != numel:
        raise ValueError(
            f"flat_values must have numel={numel} elements, got shape {tuple(flat_values.shape)}"
        )
    return flat_values.reshape(numel)


def _check_compact(compact: torch.Tensor, length: int, flat: torch.Tensor) -> torch.Tensor:
    if compact.numel() != length:
        raise ValueError(
            f"compact must have {length} elements, got shape {tuple(compact.shape)}"
        )
    return compact.reshape(length).to(dtype=flat.dtype)


def _unpack_bits(storage: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bitmap -> flat bool of ``numel`` (bit set = True)."""
    bit = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=storage.device)
    return torch.bitwise_and(storage.unsqueeze(1), bit).ne(0).reshape(-1)[:numel]


def _index_to_bool(index: torch.Tensor, numel: int, value: bool) -> torch.Tensor:
    """Flat bool of ``numel``: ``value`` at ``index`` (int32 or int64), ``not value`` elsewhere."""
    fill = torch.zeros if value else torch.ones
    out = fill(numel, dtype=torch.bool, device=index.device)
    return out.index_put((index,), torch.tensor(value, device=index.device))


def _compact_true(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending int64 positions of the ``count`` True entries of the flat bool ``flags``.

    ``nonzero_static`` has an output size fixed by ``count`` (not by the data),
    so it traces like any other op; one ``O(n)`` pass, no sort.
    """
    return torch.nonzero_static(flags, size=count).reshape(count)


def pruned_bool(
    storage: torch.Tensor, encoding: MaskEncoding | str, numel: int, n_pruned: int
) -> torch.Tensor:
    """Flat bool tensor ``(numel,)``, True where the position is pruned."""
    enc = _prep(storage, encoding, numel, n_pruned)
    return _pruned_bool(storage, enc, numel)


def _pruned_bool(storage: torch.Tensor, enc: MaskEncoding, numel: int) -> torch.Tensor:
    if enc is MaskEncoding.BITMAP:
        return _unpack_bits(storage, numel)
    return _index_to_bool(storage, numel, enc is MaskEncoding.PRUNED_INDICES)


def _pruned_index(
    storage: torch.Tensor, enc: MaskEncoding, numel: int, n_pruned: int
) -> torch.Tensor:
    """Pruned flat indices as an index tensor (the int32 storage itself when possible)."""
    if enc is MaskEncoding.PRUNED_INDICES:
        return storage
    return _compact_true(_pruned_bool(storage, enc, numel), n_pruned)


def _active_index(
    storage: torch.Tensor, enc: MaskEncoding, numel: int, n_pruned: int
) -> torch.Tensor:
    """Active flat indices as an index tensor (the int32 storage itself when possible)."""
    if enc is MaskEncoding.ACTIVE_INDICES:
        return storage
    return _compact_true(~_pruned_bool(storage, enc, numel), numel - n_pruned)


def pruned_flat_indices(
    storage: torch.Tensor, encoding: MaskEncoding | str, numel: int, n_pruned: int
) -> torch.Tensor:
    """int64 ``(n_pruned,)`` flat indices of the pruned positions, ascending."""
    enc = _prep(storage, encoding, numel, n_pruned)
    return _pruned_index(storage, enc, numel, n_pruned).to(torch.int64)


def active_flat_indices(
    storage: torch.Tensor, encoding: MaskEncoding | str, numel: int, n_pruned: int
) -> torch.Tensor:
    """int64 ``(numel - n_pruned,)`` flat indices of the active positions, ascending."""
    enc = _prep(storage, encoding, numel, n_pruned)
    return _active_index(storage, enc, numel, n_pruned).to(torch.int64)


def _selected_index(storage, enc: MaskEncoding, numel: int, n_pruned: int, pruned: bool) -> torch.Tensor:
    return (_pruned_index if pruned else _active_index)(storage, enc, numel, n_pruned)


def _gather(flat_values, storage, encoding, numel: int, n_pruned: int, pruned: bool) -> torch.Tensor:
    enc = _prep(storage, encoding, numel, n_pruned)
    flat = _flat_view(flat_values, numel)
    return flat.index_select(0, _selected_index(storage, enc, numel, n_pruned, pruned))


def _scatter(flat_values, compact, storage, encoding, numel: int, n_pruned: int, pruned: bool) -> torch.Tensor:
    enc = _prep(storage, encoding, numel, n_pruned)
    flat = _flat_view(flat_values, numel)
    src = _check_compact(compact, n_pruned if pruned else numel - n_pruned, flat)
    idx = _selected_index(storage, enc, numel, n_pruned, pruned)
    return flat.index_put((idx,), src).reshape(flat_values.shape)


def gather_pruned(
    flat_values: torch.Tensor,
    storage: torch.Tensor,
    encoding: MaskEncoding | str,
    numel: int,
    n_pruned: int,
) -> torch.Tensor:
    """Values of ``flat_values`` at the pruned positions, ``(n_pruned,)``, ascending order.

    With ``PRUNED_INDICES`` storage this is a single ``index_select``.
    """
    return _gather(flat_values, storage, encoding, numel, n_pruned, pruned=True)


def gather_active(
    flat_values: torch.Tensor,
    storage: torch.Tensor,
    encoding: MaskEncoding | str,
    numel: int,
    n_pruned: int,
) -> torch.Tensor:
    """Values of ``flat_values`` at the active positions, ``(numel - n_pruned,)``, ascending."""
    return _gather(flat_values, storage, encoding, numel, n_pruned, pruned=False)


def scatter_pruned(
    flat_values: torch.Tensor,
    compact: torch.Tensor,
    storage: torch.Tensor,
    encoding: MaskEncoding | str,
    numel: int,
    n_pruned: int,
) -> torch.Tensor:
    """Out-of-place: ``flat_values`` with the pruned positions set to ``compact``.

    ``compact`` holds ``n_pruned`` values in ascending flat-index order; it is
    cast to ``flat_values.dtype``.  The result has the shape of ``flat_values``.
    """
    return _scatter(flat_values, compact, storage, encoding, numel, n_pruned, pruned=True)


def scatter_active(
    flat_values: torch.Tensor,
    compact: torch.Tensor,
    storage: torch.Tensor,
    encoding: MaskEncoding | str,
    numel: int,
    n_pruned: int,
) -> torch.Tensor:
    """Out-of-place: ``flat_values`` with the active positions set to ``compact``.

    ``compact`` holds ``numel - n_pruned`` values in ascending flat-index order;
    it is cast to ``flat_values.dtype``.  The result has the shape of ``flat_values``.
    """
    return _scatter(flat_values, compact, storage, encoding, numel, n_pruned, pruned=False)


def zero_pruned(
    flat_values: torch.Tensor,
    storage: torch.Tensor,
    encoding: MaskEncoding | str,
    numel: int,
    n_pruned: int,
) -> torch.Tensor:
    """Out-of-place: ``flat_values`` with the pruned positions set to zero (shape kept).

    Uses ``index_put``/``masked_fill``, so non-finite values at pruned
    positions still become exactly zero.
    """
    enc = _prep(storage, encoding, numel, n_pruned)
    flat = _flat_view(flat_values, numel)
    if enc is MaskEncoding.PRUNED_INDICES:
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        out = flat.index_put((storage,), zero)
    else:
        out = flat.masked_fill(_pruned_bool(storage, enc, numel), 0)
    return out.reshape(flat_values.shape)


# --------------------------------------------------------------------------
# Full validation of stored data (eager only)
# --------------------------------------------------------------------------


def _validate_contents(
    storage: torch.Tensor, encoding: MaskEncoding, numel: int, n_pruned: int
) -> None:
    """Check that ``storage`` really encodes ``n_pruned`` pruned positions of ``numel``."""
    if encoding is MaskEncoding.BITMAP:
        tail = numel % 8
        if tail and storage.numel() and int(storage[-1]) >> tail:
            raise ValueError("storage: bitmap padding bits past numel must be zero")
        count = int(_unpack_bits(storage, numel).sum()) if numel else 0
        if count != n_pruned:
            raise ValueError(
                f"storage: bitmap has {count} pruned bits but n_pruned={n_pruned}"
            )
        return
    if storage.numel() == 0:
        return
    idx = storage.to(torch.int64)
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise ValueError(f"storage: {encoding.value} must lie in [0, {numel})")
    if storage.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"storage: {encoding.value} must be strictly increasing")


# --------------------------------------------------------------------------
# SparseMask
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskStats:
    """Counts of a mask: ``total`` = ``n_active`` + ``n_pruned``; ``sparsity`` = pruned / total."""

    total: int
    n_active: int
    n_pruned: int
    sparsity: float


_STATE_KEYS = ("shape", "n_pruned", "encoding", "storage")


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
        if mask.dtype == torch.bool:
            pruned = ~mask
        else:
            pruned = mask == 0
            if mask.numel() and not bool((pruned | (mask == 1)).all()):
                raise ValueError("mask must be boolean or contain only 0 and 1")
        return cls._from_pruned_bool(pruned, tuple(mask.shape))

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
        dense = new_dense_mask.to(self.device)
        if dense.dtype == torch.bool:
            pruned = ~dense
        else:
            pruned = dense == 0
            if dense.numel() and not bool((pruned | (dense == 1)).all()):
                raise ValueError("new_dense_mask must be boolean or contain only 0 and 1")
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
