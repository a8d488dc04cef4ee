"""How a quantized layer runs: one kernel per (layer shape, token-count bucket, device, dtype), chosen by measuring.

    y = kernels.run(layer, x)          # what QuantLinear.forward does
    kernels.choices(model.module)      # {"int4": 12, "dequant": 2} per bucket, for info/stats/tooltips

No kernel wins everywhere (cpu-kernels.md: tinygemm int4 leads at 32 tokens, dequantize-then-GEMM at 256;
on AVX2-only CPUs int8 x int8 is slow, on AMX it beats bf16). So when a quantized model loads (`prepare`),
every kernel that can run a layer shape is timed on a random input in each token bucket, any whose output
disagrees with the reference dequantization (relative error above `AGREEMENT`) is dropped, and the fastest
is kept (a layer created some other way is measured at its first call). Choices are cached per machine in
the user cache folder, so the measurement runs once per shape. `DLLM_STUDIO_KERNEL` pins a kernel wherever
it can run.

A layer with quantized activations run by a kernel without integer activations (dequant for A8, any kernel for
A4) rounds them in floating point: the numerics of the quantized model, at no speed gain. Such runs are
counted as "dequant (accuracy-only, no speed kernel here)" (`SIMULATED_NOTE`), so every report says so.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from dllm_studio.quant.kernels.base import Kernel
from dllm_studio.quant.kernels.dequant import Dequant
from dllm_studio.quant.kernels.int4 import Int4
from dllm_studio.quant.kernels.int8 import W8A8, Int8

KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (Dequant, Int4, Int8, W8A8)}
BUCKETS = (32, 256)  # tokens per call the choice is measured at: a cached block, a full-sequence step
AGREEMENT = 1e-2  # a kernel must reproduce the reference dequantization this closely to be chosen
REPEATS = 3
SIMULATED_NOTE = "accuracy-only, no speed kernel here"

_decided: dict[str, str] = {}  # signature -> kernel name, this process


def bucket(tokens: int) -> int:
    """The bucket a call of `tokens` rows is run as: the nearest measured size (halfway splits on a log scale)."""
    return BUCKETS[0] if tokens * tokens <= BUCKETS[0] * BUCKETS[1] else BUCKETS[1]


def forced() -> str | None:
    name = os.environ.get("DLLM_STUDIO_KERNEL") or None
    if name is not None and name not in KERNELS:
        raise ValueError(f"DLLM_STUDIO_KERNEL={name!r} names no kernel; choose one of {', '.join(KERNELS)}.")
    return name


def shape(layer) -> str:
    """A layer's shape and grid, e.g. "4096->4096 w4a16 g128", "4096->4096 w8a8 per-channel clip0.9",
    "4096->4096 w3a16 codebook" (what, with device, dtype and bucket, decides)."""
    layout = "codebook" if layer.codebook is not None else f"g{layer.group_size}" if layer.groups > 1 else "per-channel"
    grid = f"w{layer.bits}a{layer.act_bits} {layout}"
    clip = f" clip{layer.act_clip:g}" if layer.act_bits < 16 and layer.act_clip != 1 else ""
    return f"{layer.in_features}->{layer.out_features} {grid}{' act-order' if layer.g_idx is not None else ''}{clip}"


def simulated(layer, kernel: str | None = None) -> bool:
    """Whether `layer` quantizes its activations but `kernel` rounds them in floating point instead of multiplying
    integers: accuracy-only. Without `kernel`: the kernels it has run with, or before its first call those it
    may run with on its device (any of them simulating counts)."""
    if layer.act_bits == 16:
        return False
    if kernel is not None:
        names = {kernel}
    elif layer.kernel_choice:
        names = set(layer.kernel_choice.values())
    else:
        can = [name for name, why in runnable(layer, layer.qweight.device).items() if why is None]
        names = {forced()} if forced() in can else set(can)
    return not all(KERNELS[name].integer_activations for name in names)


def counted(layer, kernel: str) -> str:
    """The name a run of `layer` by `kernel` is reported under: the kernel's, with `SIMULATED_NOTE` if simulated."""
    return f"{kernel} ({SIMULATED_NOTE})" if simulated(layer, kernel) else kernel


def activation_kernel(recipe, device: torch.device | str = "cpu") -> str:
    """How the activations a recipe quantizes would run on `device`, before any layer exists: the label of the
    kernel that multiplies them as integers, or `SIMULATED_NOTE` where none can (A4, codebook layouts); "" when
    the recipe quantizes no activations of its own layers (A16, or a library runtime, which brings its kernels)."""
    if recipe.abits == 16 or recipe.spec.layout == "library":
        return ""
    if recipe.spec.layout == "codebook":  # non-uniform levels have no integer product to take
        return SIMULATED_NOTE
    from dllm_studio.quant.qlinear import QuantLinear  # (it imports this module)

    # A per-channel layer of the recipe's bits, on meta: what `unsupported` reads is its shape and grid.
    probe = QuantLinear(64, 64, recipe.wbits, None, act_bits=recipe.abits, device="meta")
    device = torch.device(device)
    return next((kernel.label for kernel in KERNELS.values()
                 if kernel.integer_activations and kernel.unsupported(probe, device) is None), SIMULATED_NOTE)


def signature(layer, device: torch.device, dtype: torch.dtype, tokens: int) -> str:
    """What decides which kernel is fastest: the layer's shape and grid, the device, the dtype, the bucket."""
    return f"{shape(layer)} {device.type} {str(dtype).removeprefix('torch.')} t{bucket(tokens)}"


def prepare(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Choose, at load, the kernel of every layer shape in every bucket (measured where this machine's cache has
    no choice yet), so the first denoising step does not pay for it. Returns how many shapes were seen."""
    shapes: dict[str, torch.nn.Module] = {}
    for m in module.modules():
        if hasattr(m, "kernel_choice"):
            shapes.setdefault(shape(m), m)
    for layer in shapes.values():
        for b in BUCKETS:
            _choose(layer, layer.qweight.device, dtype, b)
    return len(shapes)


def plan(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Per layer shape: its layers, the kernels that can run it, and the choice per bucket where this machine's
    cache holds one (None: measured at first use). Reads no weights, so `info` can show it for a model on meta."""
    rows: dict[str, dict] = {}
    pinned = forced()
    cache = _cache()
    for m in module.modules():
        if not hasattr(m, "kernel_choice"):
            continue
        row = rows.setdefault(shape(m), {"shape": shape(m), "layers": 0, "runnable": [
            name for name, why in runnable(m, device).items() if why is None], "chosen": {}})
        row["layers"] += 1
        for b in BUCKETS:
            can = row["runnable"]
            known = pinned if pinned in can else can[0] if len(can) == 1 else cache.get(signature(m, device, dtype, b))
            row["chosen"][b] = known
        # Accuracy-only where a chosen kernel simulates the rounding, or, not chosen yet, where no runnable one
        # multiplies integer activations.
        row["simulated"] = m.act_bits < 16 and any(
            simulated(m, name) if name else not any(KERNELS[k].integer_activations for k in row["runnable"])
            for name in row["chosen"].values())
    return list(rows.values())


def runnable(layer, device: torch.device) -> dict[str, str | None]:
    """Every kernel and why it cannot run `layer` on `device` (None: it can)."""
    return {name: kernel.unsupported(layer, device) for name, kernel in KERNELS.items()}


def run(layer, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s output for x (..., in), without the bias, through the kernel chosen for it."""
    rows = x.reshape(-1, layer.in_features)
    kernel = kernel_for(layer, rows.device, rows.dtype, rows.shape[0])
    return kernel(rows).reshape(*x.shape[:-1], layer.out_features)


def kernel_for(layer, device: torch.device, dtype: torch.dtype, tokens: int) -> Kernel:
    name = layer.kernel_choice.get(bucket(tokens))
    if name is None:
        name = _choose(layer, device, dtype, tokens)
        if name != "dequant" and name not in layer.built_kernels and not _agrees(layer, name, device, dtype):
            name = "dequant"
        layer.kernel_choice[bucket(tokens)] = name
    built = layer.built_kernels
    if name not in built:
        built[name] = KERNELS[name](layer)
    kernel = built[name]
    if getattr(kernel, "holds_codes", False) and layer.codes_source is None:
        layer.release_codes(kernel)  # one copy of the codes, in the layout this kernel reads
    return kernel


def _agrees(layer, name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether kernel `name` reproduces this layer's reference output. The choice was measured on one layer of
    the shape; this layer's own grid decides the bf16 rounding (an outlier-stretched per-channel scale can
    push tinygemm past `AGREEMENT`), so each layer is checked once before it runs anything but `dequant`."""
    x = torch.randn(8, layer.in_features, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    kernel = KERNELS[name](layer)
    reference = Dequant(layer)(x).float()
    err = float((kernel(x).float() - reference).norm() / reference.norm().clamp_min(1e-12))
    if err <= AGREEMENT:
        layer.built_kernels[name] = kernel
        return True
    return False


def choices(module: torch.nn.Module) -> dict[int, dict[str, int]]:
    """{bucket: {kernel: layers}} over the quantized layers that have run (a layer not yet run is absent); a
    simulated run is counted under `counted`'s name, e.g. "dequant (accuracy-only, no speed kernel here)"."""
    counts: dict[int, dict[str, int]] = {}
    for m in module.modules():
        for b, name in getattr(m, "kernel_choice", {}).items():
            key = counted(m, name)
            counts.setdefault(b, {}).setdefault(key, 0)
            counts[b][key] += 1
    return counts


def ran(module: torch.nn.Module) -> dict[str, int]:
    """{kernel: layer-bucket pairs} over every bucket that has run (what an evaluation over many prompts reports)."""
    total: dict[str, int] = {}
    for counts in choices(module).values():
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


def used(module: torch.nn.Module, tokens: int) -> dict[str, int]:
    """{kernel: layers} that ran calls of `tokens` rows (what a generation's stats report)."""
    return choices(module).get(bucket(tokens), {})


def describe(counts: dict[int, dict[str, int]]) -> str:
    """e.g. "int4 x14 at 32 tokens; dequant x14 at 256 tokens"; "" when nothing has run. Simulated activation
    rounding shows as "dequant (accuracy-only, no speed kernel here) x14" (`choices`)."""
    parts = []
    for b in sorted(counts):
        names = ", ".join(f"{k} x{v}" for k, v in sorted(counts[b].items(), key=lambda kv: -kv[1]))
        parts.append(f"{names} at {b} tokens")
    return "; ".join(parts)


def _choose(layer, device: torch.device, dtype: torch.dtype, tokens: int) -> str:
    can = [name for name, why in runnable(layer, device).items() if why is None]
    pinned = forced()
    if pinned in can:
        return pinned
    if len(can) == 1:
        return can[0]
    key = signature(layer, device, dtype, tokens)
    cached = _decided.get(key) or _cache().get(key)
    if cached in can:
        _decided[key] = cached
        return cached
    _decided[key] = measure(layer, device, dtype, bucket(tokens), can)["chosen"]
    _save(key, _decided[key])
    return _decided[key]


def measure(layer, device: torch.device, dtype: torch.dtype, tokens: int, names: list[str]) -> dict:
    """Time each kernel in `names` on a random (tokens, in) input, interleaved; {"chosen", "ms", "rejected"}."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, layer.in_features, generator=gen).to(device=device, dtype=dtype)
    built = {name: layer.built_kernels.get(name) or KERNELS[name](layer) for name in names}
    reference = built["dequant"](x).float() if "dequant" in built else Dequant(layer)(x).float()
    times: dict[str, list[float]] = {name: [] for name in names}
    rejected = {}
    for name, kernel in built.items():
        err = float((kernel(x).float() - reference).norm() / reference.norm().clamp_min(1e-12))
        if not err <= AGREEMENT:  # also refuses NaN
            rejected[name] = f"relative error {err:.3g} against the reference dequantization"
    for _ in range(REPEATS):
        for name, kernel in built.items():
            if name not in rejected:
                times[name].append(_timed(kernel, x, device))
    ms = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items() if t}
    chosen = min(ms, key=ms.get)
    return {"chosen": chosen, "ms": ms, "rejected": rejected}


def _timed(kernel: Kernel, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    kernel(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---- the per-machine cache -------------------------------------------------------------------------

def cache_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("dLLM Studio", appauthor=False)) / "kernels.json"


def machine() -> str:
    """The key choices are cached under: CPU model and units, threads, torch build (and the GPU if any)."""
    from dllm_studio.hardware import cpu_units

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}; {cpu_units().line()}; torch {torch.__version__}{gpu}"


def _cache() -> dict[str, str]:
    try:
        return json.loads(cache_path().read_text()).get(machine(), {})
    except (OSError, ValueError, AttributeError):
        return {}  # no cache yet, or one we cannot read: measure again rather than fail


def _save(key: str, name: str) -> None:
    from dllm_studio.errors import WriteError
    from dllm_studio.files import atomic_write_text

    path = cache_path()
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    table.setdefault(machine(), {})[key] = name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True))
    except (OSError, WriteError):
        pass  # a read-only cache folder costs a re-measurement next time, nothing else

