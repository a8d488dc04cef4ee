"""Quantize a model larger than memory: blocks stream from the checkpoint's shards to the output folder.

    model = load_model("GSAI-ML/LLaDA-8B-Instruct", device="meta")   # described from the headers, nothing read
    report = jobs.run(quantize_to_folder(model, QuantRecipe(method="gptq"), "out/"), on_event=print)

The model is a skeleton on `meta`. The block loop (`pipeline.quantize`) runs with a `Streamed` store:
1. the tensors outside the blocks (embedding, final norm) are read from the shards only while the calibration
   batch is embedded, and released;
2. each block's tensors are read from whichever shards hold them (the index's weight map), at the dtype the
   model computes in; the method quantizes that block in place (there is no other copy to protect), fed the
   hidden states the quantized blocks before it produced;
3. the quantized block is written, as stored, to its own file in the output's temporary folder, with the
   calibration states it produced and a progress record, then released to `meta` again;
4. at the end the output's shards are assembled from those files (and the untouched tensors copied from the
   source shards one at a time), with config, recipe, profile, model card and tokenizer files, and the
   temporary folder is renamed into place.
At most one block, its working set and the calibration states are in memory at any time.

Resume: the temporary folder `.<out>.partial` sits beside the output. A rerun of the same command (same
source files, recipe and format) continues at the first block not written; anything else starts over, and
says why (`StreamingStarted.note`).
Unquantized tensors are stored at the dtype the source checkpoint holds them in (a bf16 checkpoint computed
in fp32 on an AVX2 CPU is written back as bf16), so the output is no bigger than the source needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dllm_studio import shards
from dllm_studio.checkpoint import folder_fingerprint, held_shapes, nonfinite_tensors, read_header, weight_files
from dllm_studio.errors import FolderExistsError, ModelLoadError, QuantizationError
from dllm_studio.events import CancelToken, Event, ExportProgress, StreamingStarted
from dllm_studio.files import atomic_write_text, writing
from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant import export
from dllm_studio.quant.pipeline import BlockStore, QuantizationResult, quantize
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.storage import gptq_shapes, install_shells

PROGRESS = "progress.json"
STATES = "states.safetensors"
BLOCKS = "blocks"
VERSION = 1


def streaming_problem(model: DiffusionLM) -> str | None:
    """Why `model`'s weights cannot stream block by block from its folder, or None when they can: every tensor
    the module holds must be in the checkpoint under its own name (a port loaded by `load_weights`, not a
    transformers model with buffers of its own), and it must not be quantized already."""
    if model.config.get("quantization_config"):
        return "it is quantized already"
    stored = _Shards(Path(model.path)).entries
    missing = [n for n in held_shapes(model.module) if n not in stored]
    if missing or any(n not in dict(model.module.state_dict()) for n, _ in model.module.named_buffers()):
        first = missing[0] if missing else "a buffer computed at load time"
        return f"its module holds {first}, which the checkpoint does not store under that name"
    return None


def quantize_to_folder(model: DiffusionLM, recipe: QuantRecipe, out: str | Path, *, fmt: str = "native",
                       max_shard_size: int | str = shards.DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                       resume: bool = True, device: str = "cpu", cancel: CancelToken | None = None
                       ) -> Generator[Event, None, tuple[QuantizationResult, dict]]:
    """The job that quantizes `model` (described on meta: `load_model(..., device="meta")`) straight into the
    folder `out`, streaming its blocks (see the module docstring). Yields `StreamingStarted`, then the
    quantization's events and the export's. Returns the quantization result (its model described on meta:
    load `out` to run it) and the export report (path, format, files, total bytes). The run quantizes the described
    blocks in place: describe the model afresh for another run."""
    if any(not t.is_meta for t in model.module.parameters()):
        raise QuantizationError("Streaming quantization takes a model described on the meta device "
                                "(load_model(..., device='meta')); this one holds its weights already.")
    problem = streaming_problem(model)
    if problem:
        raise QuantizationError(f"{model.source} cannot be quantized streaming from its shards: {problem}.")
    recipe.validate()
    export.check_format(recipe, fmt)
    out = Path(out)
    if out.exists() and not force:
        raise FolderExistsError(out)
    if out.exists() and not out.is_dir():
        raise QuantizationError(f"{out} exists and is not a folder.")
    store = Streamed(model, recipe, out, fmt=fmt, max_shard_size=shards.parse_size(max_shard_size), device=device)
    first, note = store.prepare(resume)
    yield StreamingStarted(shards=len(store.source.files), blocks=len(model.blocks()), first_block=first + 1, note=note)
    result = yield from quantize(model, recipe, cancel, store=store)
    return result, store.report


class _Shards:
    """A checkpoint's tensors by name: which shard holds each, and its header entry."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = weight_files(folder)
        self.entries = {name: (path, entry) for path in self.files for name, entry in read_header(path).items()}

    def dtype(self, name: str) -> torch.dtype:
        return shards.DTYPES[self.entries[name][1]["dtype"]]

    def read(self, names: list[str]) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The named tensors, each shard opened once (memory-mapped: only the tensors asked for are read)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entries[name][0], []).append(name)
        for path, wanted in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in wanted:
                        yield name, f.get_tensor(name)
            except SafetensorError as exc:  # a file changed or damaged since its header was checked
                raise ModelLoadError(f"{path.name} could not be read ({exc}).") from None


class FromShards(BlockStore):
    """Blocks read from a checkpoint's shards when the loop needs them (the model lives on meta; its blocks run
    on `device`), each released to meta again once done: what a streaming run and its sensitivity pass share."""

    def __init__(self, model: DiffusionLM, device: str | torch.device = "cpu") -> None:
        self.model, self.device = model, torch.device(device)
        self.source = _Shards(Path(model.path))
        model.compute_device = self.device  # where its blocks run while the module stays a description

    @contextlib.contextmanager
    def outside_blocks(self, model, part="all"):
        groups = _outside(model, part)
        self._materialize(model.module, "", groups)
        try:
            yield
        finally:
            _release(model.module, groups)

    def open(self, model, prefix, block):
        self._materialize(block, prefix, _tensor_groups(block))
        bad = nonfinite_tensors(block.named_parameters())
        if bad:  # they would poison the calibration activations and GPTQ's Hessians
            raise QuantizationError(f"{model.source} cannot be quantized: tensor {prefix}{bad[0]} holds NaN or infinite "
                                    "values. Repair or replace the checkpoint first.")
        return block  # quantized in place: nothing else holds it

    def _materialize(self, module: nn.Module, prefix: str, groups) -> None:
        """Read each tensor group (names sharing one tensor: tied weights stay tied) from the shards, at the
        dtype the model computes in."""
        stored = {next(prefix + n for n in names if prefix + n in self.source.entries): (old, names)
                  for old, names in groups}
        for full, tensor in self.source.read(list(stored)):
            old, names = stored[full]
            if tensor.is_floating_point():
                tensor = tensor.to(self.model.dtype)
            _put(module, names, tensor.to(self.device), isinstance(old, nn.Parameter))

    @contextlib.contextmanager
    def reading(self, model, prefix, block):
        self.open(model, prefix, block)
        try:
            yield block
        finally:
            block.to("meta")


class Streamed(FromShards):
    """The block store of a streaming run: blocks read from the source shards, written to `out`'s temporary
    folder as they are done (see the module docstring)."""

    def __init__(self, model: DiffusionLM, recipe: QuantRecipe, out: Path, *, fmt: str, max_shard_size: int,
                 device: str) -> None:
        super().__init__(model, device)
        self.recipe, self.out, self.fmt, self.max_shard_size = recipe, out, fmt, max_shard_size
        self.tmp = out.parent / f".{out.name}.partial"
        # What must be the same for a rerun to continue an earlier run (as JSON reads it back: lists, not tuples).
        self.key = json.loads(json.dumps({"version": VERSION, "source": folder_fingerprint(Path(model.path)),
                                          "dtype": str(model.dtype), "recipe": recipe.to_dict(), "format": fmt}))
        self.done: dict = {"blocks": 0, "records": {}, "qconfig": {}}
        self.report: dict = {}

    # --- resume -----------------------------------------------------------------------------
    def prepare(self, resume: bool) -> tuple[int, str]:
        """Look at what an earlier run left: (the first block to quantize, what happened to the earlier run)."""
        saved = _read_json(self.tmp / PROGRESS)
        if saved is None:
            note = ""
        elif not resume:
            note = f"started over: --no-resume discards the {saved.get('blocks', 0)} blocks an earlier run finished"
        elif saved.get("key") != self.key:
            changed = [k for k in self.key if saved.get("key", {}).get(k) != self.key[k]]
            note = f"started over: the earlier run's {', '.join(changed) or 'record'} differs from this one's"
        elif not all((self.tmp / BLOCKS / _block_file(i)).is_file() for i in range(saved["blocks"])) or (
                saved["blocks"] and not (self.tmp / STATES).is_file()):
            note = "started over: the earlier run's temporary files are incomplete"
        else:
            self.done = {k: saved[k] for k in self.done}
            return self.done["blocks"], f"resumed: blocks 1-{self.done['blocks']} were done by an earlier run"
        shutil.rmtree(self.tmp, ignore_errors=True)
        with writing(self.tmp, QuantizationError):
            (self.tmp / BLOCKS).mkdir(parents=True)
        return 0, note

    def resume(self, model, recipe, blocks):
        first = self.done["blocks"]
        if not first:
            return 0, None, {}
        # The finished blocks' quantized layout, described on meta (the files' names are qualified).
        shapes = {n: tuple(e["shape"]) for i in range(first)
                  for n, e in read_header(self.tmp / BLOCKS / _block_file(i)).items()}
        qconfig = self.done["qconfig"]
        install_shells(model.module, qconfig, gptq_shapes(shapes, qconfig) if self.fmt == "gptq" else shapes)
        with safe_open(str(self.tmp / STATES), framework="pt") as f:
            states = [f.get_tensor(str(i)).to(model.device) for i in range(len(f.keys()))]
        return first, states, dict(self.done["records"])

    def keep(self, index, prefix, work, states, records):
        from dllm_studio.quant.pipeline import quantization_config

        tensors = self._stored(work, prefix)
        path = self.tmp / BLOCKS / _block_file(index)
        with writing(path, QuantizationError, after="; the blocks finished so far are kept for a rerun"):
            _save_atomic(tensors, path)
            _save_atomic({str(i): s.contiguous() for i, s in enumerate(states)}, self.tmp / STATES)
            # What install_shells needs to describe this block again on a resumed run: the layers' grids, and
            # the transforms they share (stored once, under the first reader's name).
            qconfig = export.gptq_config(self.recipe) if self.fmt == "gptq" else quantization_config(self.recipe, work)
            shared = {prefix + k: prefix + v for k, v in qconfig.pop("shared_transforms", {}).items()}
            self.done["qconfig"] = {**qconfig, "shared_transforms": {**self.done["qconfig"].get("shared_transforms", {}),
                                                                       **shared}}
            self.done["records"].update(records)
            self.done["blocks"] = index + 1
            atomic_write_text(self.tmp / PROGRESS, json.dumps({"key": self.key, **self.done}, indent=1),
                              QuantizationError)
        work.to("meta")  # released: the quantized model stays a description of shapes and dtypes
        _return_freed_memory()

    def _stored(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """A quantized block's tensors as the output stores them (qualified names): the format's layout, and the
        floating-point tensors the source holds too (norms, biases) at its dtype; packed layers and transforms keep
        theirs."""
        stored = {}
        for entry in export.format_entries(module, self.fmt, self.recipe):
            name, tensor, full = entry.name, entry.load(), prefix + entry.name
            if tensor.is_floating_point() and full in self.source.entries:
                tensor = tensor.to(self.source.dtype(full))
            stored[full] = tensor.detach().contiguous().cpu()
        return stored

    # --- the output folder ------------------------------------------------------------------
    def finish(self, original, result, cancel):
        """Assemble the output's shards in the temporary folder (the block files in order, the tensors outside the
        blocks from memory where the method replaced them, else copied from the source), write the folder's other
        files and rename it into place."""
        quantized = result.model
        entries = self._entries(original, quantized)
        with writing(self.out, QuantizationError, after="; the blocks finished so far are kept for a rerun"):
            for stale in self.tmp.glob("model*.safetensors*"):  # an earlier, interrupted assembly
                stale.unlink()
            writer = shards.write_sharded(self.tmp, entries, self.max_shard_size, {"format": "pt"})
            while True:
                try:
                    done, total = next(writer)
                except StopIteration as finished:
                    files = finished.value
                    break
                yield ExportProgress("tensors", done, total)
                cancel.check()
            profile = {"summary": result.summary, "layers": result.layers}
            yield from export.write_metadata(self.tmp, quantized, self.fmt, self._config(quantized), profile,
                                             cancel=cancel)
            shutil.rmtree(self.tmp / BLOCKS)
            for path in (self.tmp / STATES, self.tmp / PROGRESS):
                path.unlink(missing_ok=True)
            export.replace_folder(self.tmp, self.out)
        quantized.module.to("meta")  # written: what the method made outside the blocks is released too
        listed = sorted((p.name, p.stat().st_size) for p in self.out.iterdir() if p.is_file())
        self.report = {"path": str(self.out), "format": self.fmt, "files": listed,
                       "total_bytes": sum(size for _, size in listed),
                       "shards": sum(name.endswith(".safetensors") for name, _ in files)}

    def _config(self, quantized: DiffusionLM) -> dict:
        config = dict(quantized.config)
        if self.fmt == "gptq":
            config["quantization_config"] = export.gptq_config(self.recipe)
        return config

    def _entries(self, original: DiffusionLM, quantized: DiffusionLM) -> list[shards.TensorEntry]:
        """Every tensor of the output: those outside the blocks that come before them in the module (the
        embedding), each block's from its file, then the rest (final norm, head). Those outside the blocks come
        from memory where the method replaced them or the head was quantized, else from the source shards."""
        prefixes = [_block_prefix(original, i) for i in range(len(original.blocks()))]
        in_blocks = lambda name: (name + ".").startswith(tuple(prefixes))  # noqa: E731  (tensor or module names)
        order = list(quantized.module.state_dict(keep_vars=True))
        before = set(order[:next(i for i, name in enumerate(order) if in_blocks(name))])
        outside = [self._outside_entry(e) for e in export.format_entries(quantized.module, self.fmt, self.recipe,
                                                                          keep=lambda n: not in_blocks(n))]
        blocks = shards.entries_from_files([self.tmp / BLOCKS / _block_file(i) for i in range(len(prefixes))])
        return ([e for e in outside if e.name in before] + blocks + [e for e in outside if e.name not in before])

    def _outside_entry(self, entry: shards.TensorEntry) -> shards.TensorEntry:
        """A tensor outside the blocks as the output stores it: untouched (still on meta), the source's bytes;
        replaced, from memory, at the source's dtype unless it is a quantized buffer."""
        name, tensor = entry.name, entry.load()
        if tensor.is_meta:
            return shards.TensorEntry(name, self.source.dtype(name), entry.shape, lambda: next(self.source.read([name]))[1])
        if tensor.is_floating_point() and name in self.source.entries:
            tensor = tensor.to(self.source.dtype(name))
        return shards.TensorEntry.of(name, tensor.detach().contiguous().cpu())


def _outside(model: DiffusionLM, part: str) -> list[tuple[torch.Tensor, list[str]]]:
    """The tensor groups outside the blocks, in the module's order: "all" of them, "none", or the "input" ones,
    those before the first block (an 8B's head is another 2 GB at fp32, and the calibration batch never needs it
    to reach the first block)."""
    if part == "none":
        return []
    in_blocks = {id(t) for t in model.blocks().state_dict(keep_vars=True).values()}
    groups = []
    for tensor, names in _tensor_groups(model.module):
        if id(tensor) in in_blocks:
            if part == "input":
                break
            continue
        groups.append((tensor, names))
    return groups


def _tensor_groups(module: nn.Module) -> list[tuple[torch.Tensor, list[str]]]:
    """Each tensor `module` holds, with every name it goes by (tied weights have several)."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), (tensor, []))[1].append(name)
    return list(groups.values())


def _put(module: nn.Module, names: list[str], tensor: torch.Tensor, parameter: bool) -> None:
    """Make `tensor` the one tensor behind `names` (a parameter or a buffer, as it was)."""
    value = nn.Parameter(tensor, requires_grad=False) if parameter else tensor
    for name in names:
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if parameter:
            setattr(target, attr, value)
        else:
            target.register_buffer(attr, value)


def _release(module: nn.Module, groups) -> None:
    """Back to meta: the module keeps only the shapes and dtypes."""
    for old, names in groups:
        _put(module, names, torch.empty(old.shape, dtype=old.dtype, device="meta"), isinstance(old, nn.Parameter))


def _return_freed_memory() -> None:
    """Hand the heap a released block leaves back to the OS. glibc keeps freed chunks for reuse, and a block's
    tensors of many sizes leave it fragmented, so without this RSS creeps up block after block (by ~3 % of a block
    each time, measured) although no tensor survives."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): their allocators return memory themselves
        pass


def _block_prefix(model: DiffusionLM, index: int) -> str:
    from dllm_studio.quant.pipeline import _prefix

    return _prefix(model, model.blocks()[index])


def _block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
