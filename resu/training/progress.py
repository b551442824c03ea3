"""Progress bars per phase: tqdm when it is installed, enabled and stderr is a terminal; else silent."""

from __future__ import annotations

import sys


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def phase_bar(total: int, desc: str, enabled: bool):
    """A progress bar of ``total`` steps labelled ``desc`` (a no-op object when bars are off)."""
    if not enabled or total <= 0 or not sys.stderr.isatty():
        return _SilentBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SilentBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)
