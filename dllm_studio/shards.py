"""Safetensors files written one tensor at a time, split into shards as huggingface_hub does.

A model's tensors arrive as `TensorEntry`s: a name, a dtype and a shape known up front, and a `load` that
produces the tensor only when its bytes are written. The header is built from dtypes and shapes alone,
so at most one tensor's bytes are ever held here, however large the model (the quantizer can hand over
tensors it left in per-block temporary files, see `entries_from_files`).

The layout is huggingface_hub's `save_torch_state_dict`: tensors fill shards greedily in order, up to
`max_shard_size` bytes of tensor data each; one shard is `model.safetensors`, several are
`model-00001-of-00003.safetensors`... with `model.safetensors.index.json` mapping each tensor to its file.
Within a file, tensors are laid out as `safetensors.torch.save_file` lays them out, so a file is byte for
byte what save_file writes for the same tensors and a metadata dict of at most one key (safetensors
orders a larger metadata dict by hash).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from dllm_studio.errors import ExportError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# save_file writes tensors by dtype, in the reverse of the order safetensors' Rust `Dtype` enum declares
# them (roughly widest first, so every tensor stays aligned), then by name.
_ENUM_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64"]
_RANK = {name: i for i, name in enumerate(_ENUM_ORDER)}

# Decimal units as huggingface_hub's parse_size_to_int (KB = 1000), plus binary ones (KiB = 1024).
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes in a size (a shard limit, a memory budget): an int, or a number with a unit ("5GB", "500MB", "1.5GB", "2GiB", "1000")."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if match is None or match[2].upper() not in _UNITS:
            raise ExportError(f"{text!r} is not a size; write a number of bytes or one with a unit such as "
                              "5GB, 500MB or 2GiB (KB, MB, GB, TB count 1000s; KiB, MiB, GiB, TiB 1024s).")
        size = int(float(match[1]) * _UNITS[match[2].upper()])  # truncated, as huggingface_hub does
    if size <= 0:
        raise ExportError(f"A size must be positive; {text!r} is {size} bytes.")
    return size


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to write: what the header needs now, and `load` to produce its values when they are written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorEntry:
        """An entry for a tensor already in memory (kept by reference: nothing is copied until it is written)."""
        return cls(name, tensor.dtype, tuple(tensor.shape), lambda: tensor)


def entries_from_files(paths: Iterable[str | Path]) -> list[TensorEntry]:
    """Entries for every tensor in safetensors files, in file order; each reads its one tensor when loaded."""
    from dllm_studio.checkpoint import read_header

    entries = []
    for path in map(Path, paths):
        for name, info in read_header(path).items():
            entries.append(TensorEntry(name, DTYPES[info["dtype"]], tuple(info["shape"]),
                                       partial(_read_tensor, path, name)))
    return entries


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def plan_shards(entries: Sequence[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """The entries split into shards of at most `max_shard_size` bytes, in order: a shard is closed when the
    next tensor would not fit, and a tensor larger than the limit gets a shard of its own.

    huggingface_hub fills shards the same way, except that it sets a too-large tensor aside ahead of the shard
    being filled; here the order of the entries is kept, so that the files follow the model.
    """
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ExportError(f"The tensor {twice} is given twice; a checkpoint holds each name once.")
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    return [*shards, current]  # the last shard always holds an entry (or is the one empty file of no entries)


def shard_names(count: int) -> list[str]:
    """huggingface_hub's file names for `count` shards."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_safetensors(path: str | Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, loading one tensor at a time; returns its size in bytes."""
    writing = _stream(Path(path), entries, metadata)
    while True:
        try:
            next(writing)
        except StopIteration as stop:
            return stop.value


def write_sharded(folder: str | Path, entries: Sequence[TensorEntry], max_shard_size: int | str,
                  metadata: dict[str, str] | None = None) -> Generator[tuple[int, int], None, list[tuple[str, int]]]:
    """Write `entries` into `folder` (which exists) as shards, and the index when there are several.

    Yields (tensors written, total) after each tensor: a job reports progress and checks for a cancel
    there. Returns [(file name, bytes)], shards first. Every shard carries `metadata`, since the loader reads
    it from each file (huggingface_hub moves it into the index instead); the index carries `total_size`, the
    bytes of tensor data, as huggingface_hub writes it.
    """
    folder = Path(folder)
    shards = plan_shards(entries, parse_size(max_shard_size))
    names, done, files = shard_names(len(shards)), 0, []
    for name, shard in zip(names, shards):
        files.append((name, (yield from _stream(folder / name, shard, metadata, done, len(entries)))))
        done += len(shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(entry.nbytes for entry in entries)},
                 "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard}}
        text = json.dumps(index, indent=2)
        (folder / INDEX_FILE).write_text(text, encoding="utf-8")
        files.append((INDEX_FILE, len(text.encode())))
    return files


def _stream(path: Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None, done: int = 0,
            total: int | None = None) -> Generator[tuple[int, int], None, int]:
    """Write the file, yielding (done + tensors written, total) after each tensor; returns the file's size."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ExportError(f"Safetensors metadata maps text to text; {path.name} was given {metadata!r}.")
    for entry in entries:
        if entry.dtype not in DTYPE_NAMES:
            raise ExportError(f"The tensor {entry.name} is {entry.dtype}, which safetensors cannot store.")
    ordered = sorted(entries, key=lambda e: (-_RANK[DTYPE_NAMES[e.dtype]], e.name))
    header, offset = {} if metadata is None else {"__metadata__": metadata}, 0
    for entry in ordered:
        header[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for i, entry in enumerate(ordered, 1):
            f.write(_raw_bytes(entry))
            yield done + i, len(entries) if total is None else total
    return 8 + len(encoded) + offset


def _raw_bytes(entry: TensorEntry) -> memoryview:
    """The entry's loaded tensor as the bytes safetensors stores (C order, little-endian, on the CPU)."""
    tensor = entry.load()
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        found = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                 else type(tensor).__name__)
        raise ExportError(f"The tensor {entry.name} was announced as {entry.dtype} {entry.shape} but loaded as "
                          f"{found}; the file would not describe its data.")
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # reshape(-1) also flattens a 0-dim tensor
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
