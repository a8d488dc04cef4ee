"""Reading model folders laid out as on the Hugging Face hub: config.json plus safetensors weights.

Only safetensors are ever read (pickle-based `.bin`/`.pt` files could run code on load). Every file
is checked before any tensor is trusted: a truncated or corrupt file, a shard missing from an index or
lying outside the folder, a FIFO or device in place of a file, a config.json whose sizes the weights cannot
hold, or a tensor whose shape or kind of values (float, integer, bool) disagrees with the model is
reported by name.
"""

from __future__ import annotations

import json
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    check_folder(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a model folder.")
    return read_json(path)


def check_folder(folder: Path) -> None:
    """Refuse a model folder holding anything but files and folders: a FIFO, device or socket in place of
    a config, tokenizer or weights file would block (or stream forever) whichever library opened it."""
    for entry in folder.iterdir():
        if not entry.is_dir():
            check_regular(entry)


def check_regular(path: Path) -> None:
    """Refuse `path` if it exists but is no regular file; checked with stat, which never opens it."""
    try:
        mode = path.stat().st_mode  # follows symlinks: what an open would reach
    except OSError:
        return  # absent or a dangling link: the caller reports the missing file
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "not a file")
        raise ModelLoadError(f"{path} is {kind}, not a regular file; model files are read only from regular files.")


def read_json(path: Path) -> dict:
    check_regular(path)
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
        for name in files:
            if not isinstance(name, str) or not name:
                raise ModelLoadError(f"{index}: weight_map names a shard {name!r}, which is not a file name.")
            _check_inside(folder, folder / name, f"{index}: shard {name!r}")
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} is incomplete: shard {missing[0]} named in {INDEX_FILE} is missing.")
        return [folder / name for name in files]
    found = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    for path in found:
        _check_inside(folder, path, str(path))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle-format weights ({pickles[0]}); dLLM Studio loads safetensors only, "
            "because pickle files can run code when opened. Convert them to safetensors first."
        )
    raise ModelLoadError(f"{folder} has no weights (no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file).")


def _check_inside(folder: Path, path: Path, what: str) -> None:
    """Refuse a weights file that resolves outside the model folder (an absolute name, `../`, a symlink out).

    A hub-cache snapshot is a folder of links into its repository's `blobs` folder, which is allowed too.
    """
    target = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(root) for root in roots):
        raise ModelLoadError(f"{what} resolves to {target}, outside the model folder {folder}; "
                             "a checkpoint's files must lie inside its folder.")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading the tensor data.

    Returns {name: {"dtype", "shape", "data_offsets"}}; raises ModelLoadError naming the file if the
    header is malformed or the file is shorter than its header says (a partial download).
    """
    check_regular(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid safetensors file ({exc}).") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name} is not a valid safetensors file (its header is a JSON "
                             f"{type(header).__name__}, not an object).")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        span = _entry_span(entry)
        if span is None:
            raise ModelLoadError(f"{path.name} is corrupt: the header entry for {name} is malformed "
                                 "(it needs a known dtype, a shape of whole numbers and two data offsets).")
        begin, stop, nbytes = span
        if stop - begin != nbytes:
            raise ModelLoadError(f"{path.name} is corrupt: {name} does not occupy the bytes its shape needs.")
        if nbytes:
            spans.append((begin, stop, name))
    spans.sort()
    for (_, stop, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < stop:
            raise ModelLoadError(f"{path.name} is corrupt: tensors {first} and {second} overlap in the file.")
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path.name} is truncated: its header needs {8 + header_len + end:,} bytes but the file has {size:,} "
            "(an interrupted download or copy?)."
        )
    return header


def _entry_span(entry) -> tuple[int, int, int] | None:
    """(begin, stop, bytes its dtype and shape need) of a header entry, or None if the entry is malformed."""
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        return None
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(map(whole, shape)):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(whole, offsets)) or offsets[0] > offsets[1]:
        return None
    numel = 1
    for dim in shape:
        numel *= dim
    return offsets[0], offsets[1], numel * _DTYPES[entry["dtype"]].itemsize


def folder_fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    """What identifies a folder's files cheaply: names, sizes and modification times (hashing gigabytes of
    weights would cost more than the work a changed file invalidates)."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the folder's weights with its shape, from the headers alone."""
    return {name: tuple(entry["shape"]) for name, (_, entry) in _entries(folder).items()}


def _entries(folder: Path) -> dict[str, tuple[Path, dict]]:
    """Every tensor name in the folder's weights with the file holding it and its header entry."""
    return {name: (path, entry) for path in weight_files(folder) for name, entry in read_header(path).items()}


def _kind(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    return "floating-point" if dtype.is_floating_point else "boolean" if dtype == torch.bool else "integer"


def check_dtypes(folder: Path, module: torch.nn.Module) -> None:
    """Refuse a stored tensor whose kind of values (floating-point, integer, boolean) is not what the module
    holds under that name: e.g. a bool norm weight, which would otherwise be read as 1.0. Integer tensors
    are right only where the module has integer buffers (packed quantized codes)."""
    expected = module.state_dict()
    for name, (path, entry) in _entries(folder).items():
        if name in expected and _kind(entry["dtype"]) != _kind(expected[name].dtype):
            raise ModelLoadError(f"{path.name}: tensor {name} is stored as {entry['dtype']}, but the model expects "
                                 f"{_kind(expected[name].dtype)} values there.")


# config.json fields, at any depth (text_config, vision_config, ...), that count layers: each layer owns at
# least one stored tensor. And fields that size a dimension (widths, vocabulary, heads, experts): each is
# at most the largest dimension of some stored tensor (packed quantized tensors keep their output dimension).
LAYER_FIELDS = ("n_layers", "num_hidden_layers", "num_layers", "n_layer", "num_encoder_layers", "num_decoder_layers")
SIZE_FIELDS = ("d_model", "hidden_size", "n_embd", "intermediate_size", "mlp_hidden_size", "moe_intermediate_size",
               "vocab_size", "embedding_size", "n_heads", "n_head", "num_attention_heads", "n_kv_heads",
               "num_key_value_heads", "head_dim", "num_experts", "num_local_experts")


def check_config_sizes(folder: Path, config: dict) -> None:
    """Refuse a config.json whose sizes these weights cannot hold, from arithmetic on the headers alone.

    Runs before any module is built, so an absurd size (n_layers 10^9, a vocabulary of 10^12) is refused
    at once instead of building a module for it.
    """
    shapes = tensor_shapes(folder)
    largest = max((max(shape, default=1) for shape in shapes.values()), default=0)
    for key, value in _size_fields(config):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ModelLoadError(f"{folder}/config.json: {key} must be a positive whole number, not {value!r}.")
        if key in LAYER_FIELDS and value > len(shapes):
            raise ModelLoadError(f"{folder}/config.json: {key}={value:,} cannot be right: the weights hold only "
                                 f"{len(shapes):,} tensors, and every layer has tensors of its own.")
        if key in SIZE_FIELDS and value > largest:
            raise ModelLoadError(f"{folder}/config.json: {key}={value:,} cannot be right: no tensor in the weights "
                                 f"has a dimension that large (the largest is {largest:,}).")


def _size_fields(config: dict) -> Iterator[tuple[str, object]]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _size_fields(value)
        elif key in LAYER_FIELDS + SIZE_FIELDS and value is not None:
            yield key, value


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (meta tensors have no values to check, nor
    has a wrapper subclass such as torchao's Int8Tensor, which holds integer codes and only looks floating-point)."""
    return [name for name, t in named if t.is_floating_point() and not t.is_meta
            and not hasattr(t, "__tensor_flatten__") and not bool(torch.isfinite(t).all())]


FLOAT_DTYPES = {name for name, dtype in _DTYPES.items() if dtype.is_floating_point}


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
            quantized = name.endswith((".scales", ".qweight", ".qzeros", ".g_idx", ".codebook"))
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


def held_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `module` holds, by name, with their shapes: each tensor once, under its first
    name (a tensor several modules share, e.g. one transform for q, k and v, is stored once, as `export` does)."""
    seen, shapes = set(), {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


def load_into(module: torch.nn.Module, folder: Path, dtype: torch.dtype, *, shapes: Mapping | None = None,
              convert=None, keep_dtype=None) -> None:
    """Load the folder's weights into `module` (built on the meta device) strictly, shapes checked.

    For quantized checkpoints: `shapes` are the tensors' shapes once `convert(name, tensor)` (which may
    drop a tensor by returning None) has mapped them to the module's layout, and tensors for which
    `keep_dtype(name)` holds keep their stored dtype (packed codes, fp16 scales). `tensor_progress`, when set,
    hears of every tensor read and may stop the load there.
    """
    stored = tensor_shapes(folder)
    check_shapes(stored if shapes is None else shapes, held_shapes(module), folder)
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
