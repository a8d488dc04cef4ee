"""Reading model folders laid out as on the Hugging Face hub: config.json plus safetensors weights.

Only safetensors are ever read (pickle-based `.bin`/`.pt` files could run code on load). Every file
is checked before any tensor is trusted: a truncated or corrupt file, a shard missing from an index,
or a tensor whose shape disagrees with config.json is reported by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path

import torch

from dllm_studio.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Set by the job that loads a model (`models.open_model`): called with (done, total) as `load_into` reads
# each tensor; it reports progress and raises `Cancelled` once the user cancels. A context variable,
# because the families' loaders between that job and this loop take no callback.
tensor_progress: ContextVar[Callable[[int, int], None] | None] = ContextVar("tensor_progress", default=None)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a model folder.")
    return read_json(path)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object.")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model's weights, in index order."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map.")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} is incomplete: shard {missing[0]} named in {INDEX_FILE} is missing.")
        return [folder / name for name in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle-format weights ({pickles[0]}); dLLM Studio loads safetensors only, "
            "because pickle files can run code when opened. Convert them to safetensors first."
        )
    raise ModelLoadError(f"{folder} has no weights (no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file).")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading the tensor data.

    Returns {name: {"dtype", "shape", "data_offsets"}}; raises ModelLoadError naming the file if the
    header is malformed or the file is shorter than its header says (a partial download).
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid safetensors file ({exc}).") from None
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            itemsize = torch.empty(0, dtype=_DTYPES[entry["dtype"]]).element_size()
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path.name} is corrupt: the header entry for {name} is malformed.") from None
        if stop - begin != numel * itemsize:
            raise ModelLoadError(f"{path.name} is corrupt: {name} does not occupy the bytes its shape needs.")
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path.name} is truncated: its header needs {8 + header_len + end:,} bytes but the file has {size:,} "
            "(an interrupted download or copy?)."
        )
    return header


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the folder's weights with its shape, from the headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        for name, entry in read_header(path).items():
            shapes[name] = tuple(entry["shape"])
    return shapes


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def load_bytes(folder: Path, itemsize: int) -> int:
    """Bytes the folder's tensors take once loaded with floating-point weights at `itemsize` bytes each.

    Packed quantized tensors (integers, and the fp16 scales that go with them) keep their stored size.
    """
    total = 0
    for path in weight_files(folder):
        header = read_header(path)
        for name, entry in header.items():
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            stored = entry["data_offsets"][1] - entry["data_offsets"][0]
            quantized = name.endswith((".scales", ".qweight", ".qzeros", ".g_idx"))
            total += numel * itemsize if entry["dtype"] in FLOAT_DTYPES and not quantized else stored
    return total


def iter_tensors(folder: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so a loader never holds two copies of the model."""
    from safetensors import SafetensorError, safe_open

    for path in weight_files(folder):
        read_header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    yield name, tensor
        except SafetensorError as exc:
            raise ModelLoadError(f"{path.name} could not be read ({exc}).") from None


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], folder: Path) -> None:
    """Refuse a checkpoint whose tensors disagree with the model config.json describes."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(f"{folder}: tensor {missing[0]}{more} is missing from the weights.")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ModelLoadError(
                f"{folder}: tensor {name} has shape {list(found[name])} but config.json implies {list(shape)}."
            )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise ModelLoadError(f"{folder}: tensor {unexpected[0]} in the weights is not part of this architecture.")


def load_into(module: torch.nn.Module, folder: Path, dtype: torch.dtype, *, shapes: Mapping | None = None,
              convert=None, keep_dtype=None) -> None:
    """Load the folder's weights into `module` (built on the meta device) strictly, shapes checked.

    For quantized checkpoints: `shapes` are the tensors' shapes once `convert(name, tensor)` (which may
    drop a tensor by returning None) has mapped them to the module's layout, and tensors for which
    `keep_dtype(name)` holds keep their stored dtype (packed codes, fp16 scales). `tensor_progress`, when set,
    hears of every tensor read and may stop the load there.
    """
    stored = tensor_shapes(folder)
    check_shapes(stored if shapes is None else shapes, {k: tuple(v.shape) for k, v in module.state_dict().items()}, folder)
    report = tensor_progress.get()
    for done, (name, tensor) in enumerate(iter_tensors(folder), 1):
        if report is not None:
            report(done, len(stored))
        if convert is not None and (tensor := convert(name, tensor)) is None:
            continue
        if tensor.is_floating_point() and not (keep_dtype is not None and keep_dtype(name)):
            tensor = tensor.to(dtype)
        _assign(module, name, tensor)


def _assign(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(attr, tensor)
