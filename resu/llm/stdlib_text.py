"""Text for language-model experiments: the Python standard library's own ``.py`` sources.

Every Python installation has it, so nothing is downloaded. Files are split by *module* (a top-level
``.py`` file, or a whole package folder) into train / validation / test, so the splits share no file
and no package. A module's split comes from a hash of its name, so it is the same on every machine and
does not depend on which other modules exist. Test suites (``test``, ``idlelib/idle_test``, ...) and
installed third-party packages (``site-packages``) are left out.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import Any, Optional

import torch

SPLITS = ("train", "validation", "test")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_dir() -> str:
    """The folder of the running Python's standard library."""
    return sysconfig.get_paths()["stdlib"]


def split_of(module: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) of a top-level module name."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    u = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def stdlib_files(split: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), root: Optional[str] = None) -> list[str]:
    """Paths of the ``.py`` files of ``split``, sorted (relative order is deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = root or stdlib_dir()
    found = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry in _SKIP_DIRS or entry.startswith("."):
            continue
        module = entry[:-3] if entry.endswith(".py") else entry
        if os.path.isfile(path) and entry.endswith(".py"):
            files = [path]
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            files = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
        else:
            continue
        if split_of(module, fractions) == split:
            found += files
    return found


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def token_batches(
    tokenizer: Any,
    split: str,
    *,
    seq_len: int = 128,
    batch_size: int = 4,
    n_batches: int = 8,
    skip_batches: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    root: Optional[str] = None,
    shuffle_seed: Optional[int] = None,
    max_file_tokens: Optional[int] = None,
) -> list[torch.Tensor]:
    """``n_batches`` (batch_size × seq_len) tensors of token ids from the ``split`` files, after the
    first ``skip_batches`` batches' worth of tokens (so calibration and training can take disjoint text).

    The files are read in sorted order, each tokenized and joined with the end-of-sequence token,
    and the token stream is cut into rows of ``seq_len``; reading stops once enough tokens are in.
    Deterministic: the same arguments give the same batches. Raises a ValueError when the split has
    fewer tokens than asked for.

    The sorted order puts a few neighbouring modules in a short stream. For text spread over the
    whole split, ``shuffle_seed`` reads the files in a random order drawn from that seed, and
    ``max_file_tokens`` keeps at most that many tokens of each file (from its start).
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("n_batches", n_batches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"token_batches: `{name}` must be a positive int, got {value!r}")
    if not isinstance(skip_batches, int) or skip_batches < 0:
        raise ValueError(f"token_batches: `skip_batches` must be a non-negative int, got {skip_batches!r}")
    skip = seq_len * batch_size * skip_batches
    needed = skip + seq_len * batch_size * n_batches
    stream: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if max_file_tokens is not None and (not isinstance(max_file_tokens, int) or max_file_tokens < 1):
        raise ValueError(f"token_batches: `max_file_tokens` must be a positive int or None, got {max_file_tokens!r}")
    paths = stdlib_files(split, fractions, root)
    if shuffle_seed is not None:
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        paths = [paths[i] for i in order]
    for path in paths:
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"]
        stream += (ids if max_file_tokens is None else ids[:max_file_tokens]) + sep
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"token_batches: the {split!r} split has {len(stream)} tokens, fewer than the {needed} asked for")
    ids = torch.tensor(stream[skip:needed], dtype=torch.long).view(n_batches, batch_size, seq_len)
    return list(ids.unbind(0))
