"""The standard-library text splits: disjoint by module, deterministic, cut into fixed-length batches."""

import os

import pytest
import torch

from resu.llm.stdlib_text import SPLITS, split_of, stdlib_files, token_batches


def _module_of(path, root):
    return os.path.relpath(path, root).split(os.sep)[0].removesuffix(".py")


def test_splits_are_disjoint_by_module_and_cover_the_library():
    from resu.llm.stdlib_text import stdlib_dir

    root = stdlib_dir()
    files = {s: stdlib_files(s) for s in SPLITS}
    modules = {s: {_module_of(f, root) for f in files[s]} for s in SPLITS}
    assert all(files[s] for s in SPLITS)
    assert not modules["train"] & modules["validation"]
    assert not modules["train"] & modules["test"]
    assert not modules["validation"] & modules["test"]
    assert len(files["train"]) > 3 * len(files["test"])
    assert "json" in set().union(*modules.values())  # packages are modules too
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for s in SPLITS for f in files[s])
    assert stdlib_files("train") == files["train"]  # deterministic


def test_split_of_depends_only_on_the_name():
    assert split_of("json") == split_of("json")
    counts = {s: 0 for s in SPLITS}
    for i in range(2000):
        counts[split_of(f"module{i}")] += 1
    assert 0.75 < counts["train"] / 2000 < 0.85
    with pytest.raises(ValueError, match="fractions"):
        split_of("json", (0.5, 0.5, 0.5))


class _ByteTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_token_batches_shapes_and_offsets():
    tok = _ByteTokenizer()
    batches = token_batches(tok, "validation", seq_len=32, batch_size=3, n_batches=4)
    assert len(batches) == 4 and all(b.shape == (3, 32) and b.dtype == torch.long for b in batches)
    later = token_batches(tok, "validation", seq_len=32, batch_size=3, n_batches=2, skip_batches=2)
    assert torch.equal(later[0], batches[2]) and torch.equal(later[1], batches[3])
    first_file = stdlib_files("validation")[0]
    with open(first_file, encoding="utf-8") as f:
        head = list(f.read().encode("utf-8"))[:32]
    assert batches[0][0].tolist() == head
    with pytest.raises(ValueError, match="seq_len"):
        token_batches(tok, "validation", seq_len=0)
    with pytest.raises(ValueError, match="fewer than"):
        token_batches(tok, "test", seq_len=4096, batch_size=64, n_batches=64)


def test_token_batches_spread_over_the_split():
    tok = _ByteTokenizer()
    files = stdlib_files("validation")
    batches = token_batches(tok, "validation", seq_len=16, batch_size=2, n_batches=3, shuffle_seed=5, max_file_tokens=8)
    stream = torch.cat([b.reshape(-1) for b in batches]).tolist()
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(5)).tolist()
    expected = []
    for i in order:  # each file contributes its first 8 bytes, then the separator
        with open(files[i], encoding="utf-8") as f:
            expected += list(f.read().encode("utf-8"))[:8] + [tok.eos_token_id]
        if len(expected) >= len(stream):
            break
    assert stream == expected[: len(stream)]
    assert token_batches(tok, "validation", seq_len=16, batch_size=2, n_batches=3, shuffle_seed=5,
                         max_file_tokens=8)[2].tolist() == batches[2].tolist()  # deterministic
    with pytest.raises(ValueError, match="max_file_tokens"):
        token_batches(tok, "validation", max_file_tokens=0)
