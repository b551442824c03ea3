"""``BatchStream``: an endless, resumable stream of batches over a finite loader."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch


class BatchStream:
    """Yields batches from ``loader``, starting a new pass (epoch) whenever one ends.

    Its position can be saved and restored: :meth:`state_dict` records the epoch, how many batches of
    it were consumed and the global torch RNG state from just before the epoch's iterator was made
    (a shuffling ``DataLoader`` draws its order from it). :meth:`load_state_dict` replays that to
    reach the same batch, then puts the RNG state back, so a resumed run sees the same batches.
    """

    def __init__(self, loader: Iterable[Any]):
        if not hasattr(loader, "__iter__"):
            raise TypeError(f"train_loader must be iterable (a DataLoader, a list of batches, ...), got {type(loader).__name__}")
        self.loader = loader
        self.epoch = 0
        self.position = 0
        self._iterator = None
        self._rng_at_epoch_start: Optional[torch.Tensor] = None
        self._pending: Optional[dict] = None

    def next(self) -> Any:
        """The next batch."""
        if self._pending is not None:
            self._replay(self._pending)
        for _ in range(2):
            if self._iterator is None:
                self._rng_at_epoch_start = torch.get_rng_state()
                self._iterator = iter(self.loader)
                self.position = 0
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                continue
            self.position += 1
            return batch
        raise ValueError("train_loader yielded no batches; it must yield at least one batch per pass")

    def take(self, n: int) -> list:
        """The next ``n`` batches as a list."""
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict:
        """Where the stream stands (see the class docstring)."""
        if self._pending is not None:
            return dict(self._pending)
        return {
            "epoch": self.epoch,
            "position": self.position if self._iterator is not None else 0,
            "rng_at_epoch_start": self._rng_at_epoch_start if self._iterator is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` at the next :meth:`next` call."""
        self._pending = dict(state)

    @property
    def pending(self) -> bool:
        """True while a loaded state has not been reached yet (no batch drawn since :meth:`load_state_dict`)."""
        return self._pending is not None

    def _replay(self, state: dict) -> None:
        """Reach ``state``'s position; a loader shorter than it raises a ValueError, and then the stream
        keeps the pending state and the global RNG state is what it was."""
        position = int(state["position"])
        if state["rng_at_epoch_start"] is None or position == 0:
            self._pending = None
            self.epoch, self._iterator, self.position = int(state["epoch"]), None, 0
            return
        current = torch.get_rng_state()
        try:
            torch.set_rng_state(state["rng_at_epoch_start"])
            iterator = iter(self.loader)
            for consumed in range(position):
                try:
                    next(iterator)
                except StopIteration:
                    raise ValueError(
                        f"train_loader yields {consumed} batches per pass, but the saved position is batch {position} "
                        "of a pass; resume with the loader the run was saved with"
                    ) from None
        finally:
            torch.set_rng_state(current)
        self._pending = None
        self.epoch, self._iterator, self.position = int(state["epoch"]), iterator, position
        self._rng_at_epoch_start = state["rng_at_epoch_start"]
