"""The model-family registry: config.json's `model_type` picks the family that loads a folder.

    model = load_model("demo" | "path/to/folder" | "org/name")
    model = jobs.run(open_model(...), on_event)   # the same, as a cancellable job
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm_studio import jobs
from dllm_studio.checkpoint import check_config_sizes, nonfinite_tensors, read_config
from dllm_studio.errors import RemoteCodeRefusedError, UnsupportedModelError
from dllm_studio.events import CancelToken, Event, LoadProgress, LoadWarning
from dllm_studio.models.base import DiffusionLM, LinearLayer, ModelInfo

__all__ = ["DiffusionLM", "LinearLayer", "ModelInfo", "MODEL_TYPES", "family_for", "load_model", "open_model"]

# LoadProgress stages: one per weight tensor read (done of total), and the last one.
WEIGHTS_STAGE = "reading weights"
KERNELS_STAGE = "choosing the fastest kernel for each quantized layer shape on this machine"
READY_STAGE = "ready"


# model_type (lower-cased; Dream's config says "Dream") -> the module and class of its family.
# Families are imported only when a folder needs them (DiffusionGemma pulls in much of transformers).
MODEL_TYPES = {
    "llada": "llada:LLaDA",
    "dream": "dream:Dream",
    "modernbert": "modernbert_chat:ModernBertChat",
    "diffusion_gemma": "diffusion_gemma:DiffusionGemma",
}
KNOWN_UNSUPPORTED = {
    "lladamoe": "LLaDA-MoE uses a different (OLMoE-like) architecture that dLLM Studio does not implement yet",
}


def _family(key: str) -> type[DiffusionLM]:
    import importlib

    module, cls = MODEL_TYPES[key].split(":")
    return getattr(importlib.import_module(f"dllm_studio.models.{module}"), cls)


def family_for(config: dict, folder: Path, trust_remote_code: bool = False) -> type[DiffusionLM]:
    model_type = str(config.get("model_type", "")).lower()
    if model_type in MODEL_TYPES:
        return _family(model_type)
    if model_type in KNOWN_UNSUPPORTED:
        raise UnsupportedModelError(f"{folder}: {KNOWN_UNSUPPORTED[model_type]}.")
    if config.get("auto_map"):
        if not trust_remote_code:
            files = sorted({str(v).split(".")[0] + ".py" for v in _flat(config["auto_map"])})
            raise RemoteCodeRefusedError(
                f"{folder} (model_type {model_type!r}) needs the Python code in its folder ({', '.join(files)}) to run; "
                "dLLM Studio runs it only if you agree.", folder, files)
        from dllm_studio.models.remote import RemoteCodeModel

        return RemoteCodeModel
    supported = ", ".join(MODEL_TYPES)
    raise UnsupportedModelError(
        f"{folder}: model_type {config.get('model_type')!r} is not a dLLM family dLLM Studio supports ({supported}).")


def open_model(model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
               trust_remote_code: bool = False, check_memory: bool = True, runs_on: str = "cpu",
               cancel: CancelToken | None = None) -> Generator[Event, None, DiffusionLM]:
    """The job that loads `model` ("demo", a local folder or a hub id) as a ready-to-run DiffusionLM.

    Yields DownloadProgress while a hub id downloads and LoadProgress per stage and per weight tensor. Once
    `cancel` is set it stops at the next download chunk or tensor with `Cancelled`, and what it loaded is
    dropped (a cancelled download keeps the files it finished in the hub cache; see `hub.download`).
    dtype "auto" is the dtype matmuls run fastest in on the device (`hardware.fast_dtype`), or the checkpoint's
    own where only that fits in memory (see `choose_dtype`); the model's `dtype_reason` says which and why.
    With device "meta" (described from the headers, no weight read) `runs_on` is the device it would run on.
    Code from the model's folder runs only when `trust_remote_code` is True (and only for families without a
    native port).
    """
    # On a helper thread: the download and the families' loaders report from inside code that cannot yield.
    target = runs_on if torch.device(device).type == "meta" else device
    return jobs.threaded(lambda emit: _load(model, dtype, device, target, trust_remote_code, check_memory, emit),
                         cancel)


def load_model(model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
               trust_remote_code: bool = False, on_event: Callable[[Event], None] | None = None,
               check_memory: bool = True, runs_on: str = "cpu") -> DiffusionLM:
    """`open_model` run to the end, each event handed to `on_event`."""
    return jobs.run(open_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               check_memory=check_memory, runs_on=runs_on), on_event)


def _load(model: str | Path, dtype: str | torch.dtype, device: str, target: str, trust_remote_code: bool,
          check_memory: bool, emit: Callable[[Event], None]) -> DiffusionLM:
    from dllm_studio import hub
    from dllm_studio.checkpoint import tensor_progress

    folder = hub.resolve(str(model), emit)
    config = read_config(folder)
    family = family_for(config, folder, trust_remote_code)
    check_config_sizes(folder, config)  # arithmetic only, before a module of absurd size is built
    emit(LoadProgress(f"loading {family.family} weights from {folder}"))
    # Refused early, not mid-load. A described (meta) model is never refused, but says what a load would pick
    # (where the device it would run on is here to ask for its free memory).
    meta = torch.device(device).type == "meta"
    absent = torch.device(target).type == "cuda" and not torch.cuda.is_available()
    choice = choose_dtype(dtype, config, folder, target, f"Loading {model}", check_memory and not (meta and absent),
                          refuse=not meta)
    if choice.fallback:
        emit(LoadWarning(f"{folder}: loaded at {choice.reason}."))
    torch_dtype = choice.dtype
    recipe = read_recipe(folder) if config.get("quantization_config") else None  # refused before the weights load
    reporting = tensor_progress.set(lambda done, total: emit(LoadProgress(WEIGHTS_STAGE, done, total)))
    try:
        loaded = family.load(folder, source=str(model), dtype=torch_dtype, device=torch.device(device))
    finally:
        tensor_progress.reset(reporting)
    if recipe is not None:
        loaded.quantization = recipe
    loaded.dtype_reason = choice.reason
    module = loaded.module
    bad = nonfinite_tensors([*module.named_parameters(), *module.named_buffers()])
    if bad:  # the model runs, but its answers are garbage: say so, and which tensors
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        emit(LoadWarning(f"{folder}: tensor {bad[0]}{more} holds NaN or infinite values; the model's answers will be "
                         "meaningless and it cannot be quantized.", tuple(bad)))
    if config.get("quantization_config") and not meta:  # measured now, not in the first denoising step
        from dllm_studio.quant import kernels

        emit(LoadProgress(KERNELS_STAGE))
        kernels.prepare(module, torch_dtype)
    emit(LoadProgress(READY_STAGE))
    return loaded


def read_recipe(folder: Path):
    """The QuantRecipe in a quantized folder's recipe.json, or None when there is none (a peer's export).

    The file only describes how the folder was made, but a broken one is refused, naming the file and the
    setting, rather than failing somewhere later.
    """
    import json

    from dllm_studio.errors import DllmError, ModelLoadError
    from dllm_studio.quant.recipe import QuantRecipe

    path = folder / "recipe.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object of recipe settings, not {type(raw).__name__}.")
    for name, kinds in _RECIPE_TYPES.items():
        value = raw.get(name)
        if name in raw and not (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
                                and (name != "skip" or all(isinstance(v, str) for v in value))):
            raise ModelLoadError(f"{path}: setting {name!r} has the invalid value {value!r}.")
    try:
        return QuantRecipe.from_dict(raw).validate()
    except DllmError as exc:
        raise ModelLoadError(f"{path} is not a valid recipe: {exc}") from None


# recipe.json setting -> the JSON types it may hold (bool is refused where a number is meant).
_RECIPE_TYPES = {"method": (str,), "wbits": (int,), "abits": (int,), "group_size": (int, type(None)),
                 "symmetric": (bool,), "act_order": (bool,), "damp": (int, float), "calib": (str,),
                 "calib_samples": (int,), "seq_len": (int,), "masked_calib": (bool,),
                 "calib_masking": (str,), "calib_steps": (int, type(None)), "skip": (list,), "seed": (int,),
                 "layer_bits": (dict,), "memory_budget": (int, type(None)), "target_bpw": (int, float, type(None))}


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # in words, for `info`, the Models page and the stats: "float32: this CPU (AVX2) has no bf16 ..."
    fallback: bool = False  # "auto" took the checkpoint's own, smaller dtype because the fast one would not fit


def choose_dtype(dtype: str | torch.dtype, config: dict, folder: Path, device: str, what: str,
                 check_memory: bool = True, refuse: bool = True) -> DtypeChoice:
    """The dtype to load `folder` at on `device`, and why. With `check_memory` and `refuse`, a model that will
    not fit even so is refused (`InsufficientMemoryError`, naming what it needs and what is free).

    "auto" is `hardware.fast_dtype(device)`: an fp16/bf16 checkpoint is upcast to fp32 on an AVX2-only CPU, an
    fp32 one runs in bf16 where bf16 is fast. If the fast dtype would not fit but the checkpoint's own smaller
    one would, the checkpoint's is taken (slower matmuls beat no model). An explicit dtype is taken as asked.
    Packed quantized tensors keep their stored dtypes either way; the others take the chosen one.
    """
    from dllm_studio import hardware

    if dtype == "auto":
        choice = DtypeChoice(hardware.fast_dtype(device), hardware.fast_dtype_reason(device))
    elif isinstance(dtype, torch.dtype) or dtype in DTYPES:
        chosen = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]
        choice = DtypeChoice(chosen, f"{_name(chosen)}: asked for explicitly")
    else:
        raise UnsupportedModelError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
    if not check_memory or (too_big := _shortfall(what, folder, choice.dtype, device)) is None:
        return choice
    stored = DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "").removeprefix("torch."))
    if dtype == "auto" and stored is not None and stored.itemsize < choice.dtype.itemsize:
        if (still := _shortfall(what, folder, stored, device)) is None:
            from dllm_studio.memory import human

            return DtypeChoice(stored, f"{_name(stored)} as stored: {_name(choice.dtype)}, the fast dtype here, would "
                                       f"need about {human(too_big.needed)} but only {human(too_big.free)} is free",
                               fallback=True)
        too_big = still  # the least "auto" could take
    if refuse:
        raise too_big
    return choice


def _shortfall(what: str, folder: Path, dtype: torch.dtype, device: str):
    """The InsufficientMemoryError loading `folder` at `dtype` would meet, or None when it fits."""
    from dllm_studio.checkpoint import load_bytes
    from dllm_studio.errors import InsufficientMemoryError
    from dllm_studio.memory import ACTIVATION_SHARE, preflight

    weights = load_bytes(folder, dtype.itemsize)
    try:
        preflight(what, {"weights": weights, "activations and buffers": int(weights * ACTIVATION_SHARE)}, device)
    except InsufficientMemoryError as exc:
        return exc
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v) if x]
    return [value] if value else []
