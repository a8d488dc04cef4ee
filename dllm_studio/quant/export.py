"""Write a quantized model as a self-contained folder that `load_model` (and other tools) read back.

    DIR/config.json          the source config plus `quantization_config`
    DIR/model.safetensors    packed quantized layers (native or GPTQ layout) and every other tensor; past
                             max_shard_size, shards model-00001-of-0000N.safetensors... and
                             model.safetensors.index.json, as huggingface_hub writes them
    DIR/tokenizer files      copied from the source folder, with generation_config.json
    DIR/recipe.json          the recipe that made it
    DIR/profile.json         per-layer activation statistics and errors, and the summary
    DIR/README.md            a model card: method, bits, sizes, scores when known

Everything goes to a hidden sibling folder first and is renamed into place at the end, so a full
disk, a crash or a cancel never leaves a half-written model under DIR; an existing DIR is replaced only
with `force`, and only once the new folder is complete (and, when checked, reloaded and compared).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Generator
from functools import lru_cache, partial
from pathlib import Path

import torch

from dllm_studio import jobs
from dllm_studio.errors import ExportError, FolderExistsError, QuantizationError
from dllm_studio.events import CancelToken, Event, ExportProgress
from dllm_studio.files import writing
from dllm_studio.memory import quantized_sizes
from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant import runtimes
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.methods import METHODS as SPECS
from dllm_studio.quant.calibration import sampler_config
from dllm_studio.quant.recipe import CALIB_MASKINGS, FORMATS
from dllm_studio.quant.storage import gptq_checkpoint_format, quant_format, to_gptq
from dllm_studio.shards import DEFAULT_MAX_SHARD_SIZE, TensorEntry, parse_size, write_sharded

NOT_COPIED = {"config.json", "README.md", "recipe.json", "profile.json", "training.json", "eval.json",
              "recipe_search.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")
CODEBOOK_METHODS = tuple(name for name, spec in SPECS.items() if spec.layout == "codebook")  # tlq, ars
GPTQ_UNIFORM_ONLY = ("Twin-log (TLQ) codes are not uniform: the GPTQ format has no way to store them; export in "
                     "the native format")
GPTQ_WEIGHT_ONLY = ("The GPTQ format stores weight-only layers: activation quantization (W8A8, W4A4…) and online "
                    "rotations cannot be written there; export in the native format.")

GPTQ_ONE_BITS = ("A mixed-precision model (a --memory-budget or --target-bpw plan) gives its layers different bits, "
                 "and the GPTQ format's quantization_config holds one `bits` for every layer (GPTQModel's `dynamic` "
                 "per-module overrides could describe it, but dLLM Studio does not write them); export in the native "
                 "format, which records each layer's bits.")


def export(model: DiffusionLM, out: str | Path, *, fmt: str = "native", force: bool = False,
           profile: dict | None = None, scores: dict | None = None, check: bool = False,
           cancel: CancelToken | None = None,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Generator[Event, None, dict]:
    """The job that writes `model` (a quantization result) to `out`; yields ExportProgress per tensor and file.

    The weights are written one tensor at a time (each copied off an accelerator only as it is written), in
    shards of at most `max_shard_size` bytes ("5GB", "500MB", an int) named as huggingface_hub names them.

    With `check`, the written folder is reloaded and compared with `model` (see `verify`) before it is moved
    into place. Once `cancel` is set it stops at the next tensor, file or reloaded tensor with `Cancelled`,
    and nothing is left: no `out`, no temporary folder, an existing `out` untouched. Returns the folder's
    path, format, files [(name, bytes)] and total bytes, and with `check` the comparison's report.
    """
    recipe = getattr(model, "quantization", None)
    if recipe is None:
        raise ExportError(f"{model.source} is not quantized; quantize it first.")
    check_format(recipe, fmt, model.module)
    max_shard_size = parse_size(max_shard_size)
    out = Path(out)
    if out.exists() and not force:
        raise FolderExistsError(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder.")
    config = {**model.config, "quantization_config": gptq_config(recipe) if fmt == "gptq" else native_config(model)}
    # The unquantized tensors are stored at the dtype the model ran at, and verification reloads at that dtype.
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = str(model.dtype).removeprefix("torch.")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(out, ExportError, after="; nothing was written there"):
            metadata = {"format": "pt"}
            if recipe.method in runtimes.METHODS:  # the library's own layout (and torchao's tensor descriptions)
                tensors, described = runtimes.checkpoint_state(model.module)
                entries, metadata = _entries(tensors), {**metadata, **described}
            else:
                entries = format_entries(model.module, fmt, recipe)
            tmp.mkdir(parents=True)
            _check(cancel)
            for done, total in write_sharded(tmp, entries, max_shard_size, metadata):
                yield ExportProgress("tensors", done, total)
                _check(cancel)
            yield from write_metadata(tmp, model, fmt, config, profile, scores, cancel)
            report = (yield from verification(model, tmp, cancel)) if check else {}
            _check(cancel)
            replace_folder(tmp, out)
    except BaseException:  # a full disk, a cancel, an interruption, a bug, an early close: keep nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    return {"path": str(out), "format": fmt, "files": files, "total_bytes": sum(size for _, size in files), **report}


def check_format(recipe, fmt: str, module: torch.nn.Module | None = None) -> None:
    """Refuse, before anything is written, a format `fmt` that a model made with `recipe` (and, once it exists,
    holding `module`) cannot be stored in."""
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    # Known from the method before quantizing; from the layers themselves after (whatever method made them).
    codebooks = recipe.method in CODEBOOK_METHODS or module is not None and any(
        isinstance(m, QuantLinear) and m.codebook is not None for m in module.modules())
    if codebooks and fmt == "gptq":
        raise QuantizationError(GPTQ_UNIFORM_ONLY)
    runtime = runtimes.BY_METHOD.get(recipe.method)
    if runtime is not None and fmt != "native":
        raise ExportError(f"A {recipe.method} model holds {runtime.library}'s own layers, which the {fmt.upper()} "
                          f"format cannot describe; save it with --format native (written in {runtime.library}'s "
                          "own layout, which dLLM Studio reloads), or quantize with RTN, GPTQ or AWQ for a GPTQ "
                          "checkpoint.")
    if fmt == "gptq" and recipe.abits != 16:
        raise QuantizationError(GPTQ_WEIGHT_ONLY)
    # Known from the budget before quantizing (its plan will mix bits); from the layers after.
    if fmt == "gptq" and (recipe.mixed or recipe.memory_budget is not None or recipe.target_bpw is not None
                          or module is not None and len({m.bits for m in module.modules()
                                                         if isinstance(m, QuantLinear)}) > 1):
        raise QuantizationError(GPTQ_ONE_BITS)


def save_quantized(model: DiffusionLM, out: str | Path, *, fmt: str = "native", force: bool = False,
                   profile: dict | None = None, scores: dict | None = None,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """`export` run to the end, without the check; returns the folder."""
    return Path(jobs.run(export(model, out, fmt=fmt, force=force, profile=profile, scores=scores,
                                max_shard_size=max_shard_size))["path"])


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def read_profile(folder: str | Path) -> dict:
    """The profile.json `save_quantized` wrote (summary and per-layer statistics); {} when missing or unreadable,
    since it only informs and never decides how the model loads."""
    try:
        profile = json.loads((Path(folder) / "profile.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return profile if isinstance(profile, dict) else {}


VERIFY_PROMPT = [{"role": "user", "content": "What is 2 plus 3?"}]
VERIFY_MASKS = 16  # a masked answer span, as the model sees its input while denoising


def verify(model: DiffusionLM, folder: str | Path) -> dict:
    """`verification` run to the end."""
    return jobs.run(verification(model, folder))


def verification(model: DiffusionLM, folder: str | Path, cancel: CancelToken | None = None) -> Generator[Event, None, dict]:
    """The job that reloads `folder` (yielding its LoadProgress) and compares its logits with `model`'s on a chat
    prompt followed by masked positions.

    A folder that loads but answers differently is worse than no folder; this is the check that it does not.
    """
    from dllm_studio.models import open_model

    reloaded = yield from open_model(folder, dtype=model.dtype, device=str(model.device), cancel=cancel)
    ids = model.chat_ids(VERIFY_PROMPT)
    if model.mask_token_id is not None:
        ids += [model.mask_token_id] * VERIFY_MASKS
    x = torch.tensor([ids])
    with torch.inference_mode():
        a, b = model.forward(x).float().cpu(), reloaded.forward(x).float().cpu()
    disagree = int((a.argmax(-1) != b.argmax(-1)).sum())
    return {"max_abs_logit_diff": float((a - b).abs().max()), "argmax_agrees": disagree == 0,
            "argmax_disagreements": disagree, "positions": len(ids)}


def verdict_text(report: dict) -> tuple[str, bool]:
    """What `verification`'s report means in words, and whether the folder passed: the same token predicted at
    every position (logits may differ by rounding, e.g. a GPTQ folder's fp16 scales)."""
    diff, wrong = report["max_abs_logit_diff"], report["argmax_disagreements"]
    if diff == 0:
        return "Verified: reloaded model gives identical outputs", True
    if not wrong:
        return f"Verified: same predicted token everywhere; logits differ by at most {diff:.3g}", True
    return f"Reloaded model differs: another token at {wrong} of {report['positions']} positions", False


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing an existing `out` only once `tmp` is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # the existing folder stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once (safetensors refuses shared storage). Meta tensors (a streamed model's description) have no
    storage to compare: the same tensor object is the same tensor there."""
    seen, unique = set(), {}
    for name, tensor in state.items():
        key = id(tensor) if tensor.is_meta else (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def _entries(state: dict[str, torch.Tensor]) -> list[TensorEntry]:
    """Each tensor once, by reference: the writer copies it to the CPU, contiguous, as it writes it."""
    return [TensorEntry.of(name, tensor.detach()) for name, tensor in _unique(state).items()]


def format_entries(module: torch.nn.Module, fmt: str, recipe, keep=lambda name: True) -> list[TensorEntry]:
    """The tensors a checkpoint of `module` holds in `fmt`, each once, for the (module or tensor) names `keep`
    accepts: natively the module's own, by reference; in the GPTQ layout each quantized layer converted again when
    its tensors are written.

    In the GPTQ layout every layer is converted once here, one at a time, for its tensors' dtypes and shapes (and so that a layer
    the format cannot hold is refused before anything is written); writing converts it again rather than
    keeping a converted copy of the whole model. The writer takes a file's tensors by dtype and then name, so a
    layer's int32 tensors come in a row: the last conversion is kept for them.
    """
    state = {name: t for name, t in module.state_dict(keep_vars=True).items() if keep(name)}
    if fmt != "gptq":
        return _entries(state)
    layout = gptq_checkpoint_format(recipe.symmetric)
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear) and keep(name)}
    if any(m.act_bits != 16 or m.transform is not None for m in quantized.values()):
        raise QuantizationError(GPTQ_WEIGHT_ONLY)

    @lru_cache(maxsize=1)
    def converted(name: str) -> dict[str, torch.Tensor]:
        try:
            return to_gptq(quantized[name], layout)
        except ValueError as exc:
            raise ExportError(f"{name} cannot be written in the GPTQ format: {exc}.") from None

    def pick(name: str, key: str) -> torch.Tensor:
        return converted(name)[key]

    entries = [entry for entry in _entries(state) if entry.name.rpartition(".")[0] not in quantized]
    for name in quantized:
        entries += [TensorEntry(f"{name}.{key}", tensor.dtype, tuple(tensor.shape), partial(pick, name, key))
                    for key, tensor in converted(name).items()]
    converted.cache_clear()
    return entries


def native_config(model: DiffusionLM) -> dict:
    """The `quantization_config` of `model` written in the native format: its own, unless it was read from a GPTQ
    folder, whose config describes the GPTQ tensors rather than the packed ones written now."""
    qconfig = model.config["quantization_config"]
    if quant_format(qconfig) != "gptq":
        return qconfig
    from dllm_studio.quant.pipeline import quantization_config  # pipeline imports much that export needs not

    return quantization_config(model.quantization, model.module)


def gptq_config(recipe) -> dict:
    return {"quant_method": "gptq", "checkpoint_format": gptq_checkpoint_format(recipe.symmetric),
            "bits": recipe.wbits, "group_size": recipe.group_size or -1, "desc_act": recipe.act_order, "sym": recipe.symmetric,
            "damp_percent": recipe.damp, "true_sequential": True, "static_groups": False,
            "quantizer": f"dllm-studio ({recipe.method})"}


def _weight_bits(recipe) -> str:
    if not recipe.mixed:
        return f"{recipe.wbits}-bit"
    bits = sorted({recipe.wbits, *(b for _, b in recipe.layer_bits)})
    return f"mixed {bits[0]}- to {bits[-1]}-bit (each layer's in recipe.json's layer_bits)"


def model_card(model: DiffusionLM, fmt: str, profile: dict, scores: dict | None) -> str:
    recipe = model.quantization
    summary = profile.get("summary", {})
    layout = f"GPTQ ({gptq_checkpoint_format(recipe.symmetric)}) checkpoint" if fmt == "gptq" else "dLLM Studio packed"
    if recipe.method in runtimes.METHODS:
        layout = runtimes.BY_METHOD[recipe.method].library
    lines = [f"# {Path(str(model.source)).name} — {recipe.label}", "",
             f"Quantized by dLLM Studio from `{model.source}` ({model.family}) with {recipe.method.upper()}, "
             f"{_weight_bits(recipe)} weights, {'per-channel' if not recipe.group_size else f'group size {recipe.group_size}'}, "
             f"{'symmetric' if recipe.symmetric else 'asymmetric'}; stored in the "
             f"{layout} format.", ""]
    if recipe.method in runtimes.METHODS or recipe.per_channel or recipe.spec.layout == "codebook":
        # the library's own grid, or one the recipe's group size does not describe: the label says it
        from dllm_studio.quant.methods import QUANTIZED_TENSORS

        what = runtimes.METHODS.get(recipe.method, recipe.spec.description)
        acts = f" With {recipe.abits}-bit activations ({QUANTIZED_TENSORS})." if recipe.abits < 16 else ""
        lines[2] = (f"Quantized by dLLM Studio from `{model.source}` ({model.family}) with {recipe.label}: "
                    f"{what}; stored in the {layout} format.{acts}")
    if summary:
        lines += [f"- {line}" for line in quantized_sizes(summary, model.dtype)]
        lines += [f"- bits per quantized weight: {summary['bits_per_weight']} (bf16: 16)", ""]
    calib = "clean text" if not recipe.masked_calib else f"masked text ({CALIB_MASKINGS[recipe.calib_masking]})"
    if recipe.masked_calib and recipe.calib_masking == "timesteps":
        config = sampler_config(recipe)
        calib = calib[:-1] + f": {config.steps} steps, {config.gen_length} tokens in blocks of {config.block_length})"
    lines += [f"Calibration: {recipe.calib}, {recipe.calib_samples} x {recipe.seq_len} tokens, {calib}; "
              f"layers kept in full precision: {', '.join(recipe.skip) or 'none'} (and the embeddings).", ""]
    if scores:
        lines += ["| suite | score |", "|---|---|"] + [f"| {k} | {v} |" for k, v in scores.items()] + [""]
    lines += ["Load it like any model: `dllm-studio generate DIR --prompt ...`, `dllm-studio eval DIR --suite all`.", ""]
    return "\n".join(lines)


def write_metadata(folder: Path, model: DiffusionLM, fmt: str, config: dict, profile: dict, scores: dict | None = None,
                   cancel: CancelToken | None = None) -> Generator[Event, None, None]:
    """Write a quantized model folder's files besides the weights: config.json (`config`), recipe.json, profile.json,
    the model card, and the source folder's tokenizer and generation files; an ExportProgress per file."""
    copied = [source for source in sorted(Path(model.path).iterdir())
              if source.is_file() and source.name not in NOT_COPIED and not source.name.endswith(WEIGHT_SUFFIXES)]
    written = {"config.json": json.dumps(config, indent=2) + "\n",
               "recipe.json": json.dumps(model.quantization.to_dict(), indent=2) + "\n",
               "profile.json": json.dumps(profile or {}, indent=1) + "\n",
               "README.md": model_card(model, fmt, profile or {}, scores)}
    for done, item in enumerate([*written.items(), *copied], 1):
        _check(cancel)
        if isinstance(item, Path):
            shutil.copy2(item, folder / item.name)
        else:
            (folder / item[0]).write_text(item[1], encoding="utf-8")
        yield ExportProgress("files", done, len(written) + len(copied))

