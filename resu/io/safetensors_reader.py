"""Reading safetensors checkpoints one tensor at a time, for :func:`resu.load_quantized_`.

A file's header gives every tensor's name, dtype, shape and byte range; a tensor is read with plain
reads when it is asked for, never by mapping the file (a mapped file counts whole in the process's
resident memory). A checkpoint is one file, a list of shards or a folder (with or without
``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch

PathLike = Union[str, os.PathLike]

INDEX_FILE = "model.safetensors.index.json"


#: safetensors dtype names → torch dtypes (the format's own table).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class ShardFile:
    """One safetensors file, read a tensor at a time with plain reads.

    Not memory-mapped on purpose: pages of a mapping that were touched stay in the process's resident
    set until it is closed, so a mapped checkpoint read front to back ends up counted whole. Here each
    tensor is read into its own buffer, which is freed with the tensor. The header is checked (dtype,
    shape against byte length, offsets inside the file) before any tensor is read.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit in a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"load_quantized_: {path} is not a readable safetensors file ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"load_quantized_: {path} is not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self.base, self.entries = 8 + n, {}
        for key, info in header.items():
            self.entries[key] = self._entry(key, info, size - self.base)

    def _entry(self, key, info, data_size):
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"load_quantized_: {self.path}: tensor `{key}` has an unreadable header entry "
                             f"{info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise ValueError(f"load_quantized_: {self.path}: tensor `{key}` ({info['dtype']}, shape {list(shape)}) "
                             f"does not match its byte range {begin}..{end} in a {data_size}-byte data section")
        return dtype, shape, begin, end

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + begin)
            done = 0
            while done < len(view):  # a raw read may return less than asked
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"load_quantized_: {self.path} ends inside tensor `{key}`")
                done += got
        return buf.view(dtype).reshape(shape)


class Shards:
    """Random access to the tensors of one or more safetensors files (every key in exactly one file)."""

    def __init__(self, paths: list[str]):
        self.where: dict[str, ShardFile] = {}
        for path in paths:
            file = ShardFile(path)
            for key in file.entries:
                if key in self.where:
                    raise ValueError(f"load_quantized_: key `{key}` is in both {self.where[key].path} and {path}")
                self.where[key] = file

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get(key)


def shard_paths(source: Union[PathLike, list, tuple]) -> list[str]:
    """The safetensors files a path, a folder (with or without an index) or a list of paths names."""
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
        if not paths:
            raise ValueError("load_quantized_: `source` is an empty list of files")
        return paths
    path = os.fspath(source)
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            return [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not found:
            raise ValueError(f"load_quantized_: the folder {path} holds no .safetensors file and no {INDEX_FILE}")
        return [os.path.join(path, n) for n in found]
    if not os.path.isfile(path):
        raise ValueError(f"load_quantized_: `source` {path!r} is neither a safetensors file nor a folder")
    return [path]


def is_path_like(source) -> bool:
    return isinstance(source, (str, os.PathLike)) or (
        isinstance(source, (list, tuple)) and bool(source) and all(isinstance(p, (str, os.PathLike)) for p in source)
    )
