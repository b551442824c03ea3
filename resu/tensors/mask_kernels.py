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

:class:`~resu.tensors.mask.SparseMask` wraps one storage tensor with the
``shape`` it belongs to and offers the mask-level API (factories, ``apply``,
``get_pruned``, ``state_dict``, ...).
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from resu.tensors.mask_checks import MAX_NUMEL, _check_numel, _is_int  # noqa: F401  (MAX_NUMEL: re-exported)

__all__ = [
    "MaskEncoding",
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
    return (bits.view(nb, 8) << _bit_positions(flat.device, torch.int32)).sum(dim=1).to(torch.uint8)


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


def _bit_positions(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """0..7 made on ``device`` by a kernel. A constant built on the host (``torch.tensor(...,
    device=cuda)``) is a copy from pageable memory, which waits for every queued kernel: run in each
    backward (FSDP2's gradient copy-in and reduce-scatter), that wait cost the overlap of
    communication and compute."""
    return torch.arange(8, dtype=dtype, device=device)


def _unpack_bits(storage: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bitmap -> flat bool of ``numel`` (bit set = True). No host sync (see :func:`_bit_positions`)."""
    bits = torch.bitwise_right_shift(storage.unsqueeze(1), _bit_positions(storage.device, torch.uint8))
    return torch.bitwise_and(bits, 1).ne(0).reshape(-1)[:numel]


def _index_to_bool(index: torch.Tensor, numel: int, value: bool) -> torch.Tensor:
    """Flat bool of ``numel``: ``value`` at ``index`` (int32 or int64), ``not value`` elsewhere. No host sync."""
    fill = torch.zeros if value else torch.ones
    out = fill(numel, dtype=torch.bool, device=index.device)
    return out.index_put((index,), torch.full((), value, dtype=torch.bool, device=index.device))


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
    if not storage.is_contiguous():
        # The values may be right, but the kernels read the storage through its raw pointer.
        raise ValueError(f"storage: must be contiguous (the mask kernels take its raw pointer), got strides {storage.stride()}")
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
