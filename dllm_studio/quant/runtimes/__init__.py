"""Library runtimes as quantization methods: bitsandbytes, optimum-quanto and torchao next to RTN/GPTQ/AWQ.

Each library is an optional extra (`pip install -e ".[runtimes]"`). This table is importable without torch
or the libraries, so the recipe, the CLI's --help and the GUI pickers list every method and say which ones
cannot run here and why (`unavailable`). A runtime module (imported only when its method runs or a folder it
wrote loads) provides:

    convert(linear, recipe, inputs) -> nn.Module   the library's module for one nn.Linear; `inputs` are the
                                                   layer's calibration inputs (None for the LM head)
    state(name, module) -> (tensors, metadata)     what the checkpoint stores for it, safetensors-ready
    layer_names(shapes, qconfig) -> set[str]       the layers a checkpoint holds in this format
    restore(name, linear, tensors, qconfig, metadata, device) -> nn.Module   a module back from `state`'s tensors
    quantization_config(recipe, module) -> dict    config.json's `quantization_config` for the whole model
    theory_bits(recipe, in_features, dtype_bits) -> float   bits per weight of the storage
The pipeline marks every module a runtime made with `RUNTIME_ATTR` (its method), which is how the summary,
the export and the memory figures tell them from full-precision layers.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

RUNTIME_ATTR = "quant_runtime"
INSTALL_HINT = 'pip install -e ".[runtimes]"'
QUANTO_MAINTENANCE = "optimum-quanto is in maintenance mode upstream (no new features; bitsandbytes and torchao are the maintained runtimes)"


@dataclass(frozen=True)
class Runtime:
    library: str  # the pip distribution
    package: str  # what Python imports
    module: str  # ours, under dllm_studio.quant.runtimes
    quant_method: str  # config.json quantization_config.quant_method
    methods: dict[str, str]  # method -> one-line description
    wbits: dict[str, tuple[int, ...]]
    abits: dict[str, tuple[int, ...]]
    layout: dict[str, dict[int, str]]  # method -> weight bits -> how it groups weights, for the recipe's label
    note: str | None = None  # said wherever the method is picked

    def unavailable(self) -> str | None:
        """None when the library can be imported here, else why not and how to get it."""
        try:
            missing = importlib.util.find_spec(self.package) is None
        except (ImportError, ValueError):
            missing = True
        return f"{self.library} is not installed: {INSTALL_HINT}" if missing else None

    def code(self):
        """Our module for this library (it imports the library lazily, inside its functions)."""
        return importlib.import_module(f"dllm_studio.quant.runtimes.{self.module}")


RUNTIMES = (
    Runtime("bitsandbytes", "bitsandbytes", "bitsandbytes", "bitsandbytes",
            {"bnb-nf4": "bitsandbytes NF4: 4-bit NormalFloat in blocks of 64, double quant, bf16 compute",
             "bnb-fp4": "bitsandbytes FP4: 4-bit float in blocks of 64, double quant, bf16 compute",
             "bnb-int8": "bitsandbytes LLM.int8: int8 rows, input columns above 6.0 kept in 16-bit"},
            {"bnb-nf4": (4,), "bnb-fp4": (4,), "bnb-int8": (8,)},
            {"bnb-nf4": (16,), "bnb-fp4": (16,), "bnb-int8": (16,)},
            {"bnb-nf4": {4: "b64"}, "bnb-fp4": {4: "b64"}, "bnb-int8": {8: "per-channel"}}),
    Runtime("optimum-quanto", "optimum.quanto", "quanto", "quanto",
            {"quanto": "optimum-quanto: int8/int4/int2 weights (int4/int2 in groups), optional int8 activations; "
                       "maintenance mode upstream"},
            {"quanto": (8, 4, 2)}, {"quanto": (16, 8)}, {"quanto": {8: "per-channel", 4: "g128", 2: "g128"}},
            note=QUANTO_MAINTENANCE),
    Runtime("torchao", "torchao", "torchao", "torchao",
            {"torchao": "torchao: int8 weight-only (W8A16), or int8 weights x dynamic per-token int8 activations (W8A8)"},
            {"torchao": (8,)}, {"torchao": (16, 8)}, {"torchao": {8: "per-channel"}}),
)
BY_METHOD = {method: runtime for runtime in RUNTIMES for method in runtime.methods}
METHODS = {method: text for runtime in RUNTIMES for method, text in runtime.methods.items()}
WEIGHT_BITS = {method: bits for runtime in RUNTIMES for method, bits in runtime.wbits.items()}
ACTIVATION_BITS = {method: bits for runtime in RUNTIMES for method, bits in runtime.abits.items()}


def unavailable(method: str) -> str | None:
    """Why a library method cannot run here (None: it can, or it is one of ours)."""
    runtime = BY_METHOD.get(method)
    return runtime.unavailable() if runtime is not None else None


def layout(method: str, wbits: int) -> str:
    """How a library method groups the weights it scales ("b64": blocks of 64, "g128": groups of 128 columns)."""
    return BY_METHOD[method].layout[method].get(wbits, "")


def for_quant_method(quant_method: str) -> Runtime | None:
    """The runtime that writes checkpoints with this config.json `quant_method`."""
    return next((r for r in RUNTIMES if r.quant_method == quant_method), None)


def code(method: str):
    return BY_METHOD[method].code()


def convert(linear, recipe, inputs):
    """The library's module for one nn.Linear, marked with its method."""
    module = code(recipe.method).convert(linear, recipe, inputs)
    setattr(module, RUNTIME_ATTR, recipe.method)
    return module


def method_of(module) -> str | None:
    return getattr(module, RUNTIME_ATTR, None)


def held_bytes(tensor) -> int:
    """Bytes a tensor holds: a wrapper subclass (torchao's Int8Tensor) its inner tensors, a bitsandbytes 4-bit
    weight its packed data plus its quantization state (absmax and maps, which are not buffers)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__name__ != "Parameter":
        return sum(held_bytes(getattr(tensor, name)) for name in flatten()[0])
    total = tensor.numel() * tensor.element_size()
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None and getattr(tensor, "bnb_quantized", False):
        total += sum(t.numel() * t.element_size() for t in quant_state.as_dict(packed=True).values())
    return total


def stored_bytes(module) -> int:
    """Bytes the checkpoint stores for one runtime module, bias excluded (the summary's packed size)."""
    tensors, _ = code(method_of(module)).state("layer", module)
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name != "layer.bias")


def theory_bits(recipe, in_features: int | None, dtype_bits: int) -> float:
    return code(recipe.method).theory_bits(recipe, in_features, dtype_bits)


def quantization_config(recipe, module) -> dict:
    """config.json's `quantization_config` for a model (`module`) quantized by a runtime method."""
    return code(recipe.method).quantization_config(recipe, module)


def checkpoint_state(module) -> tuple[dict, dict[str, str]]:
    """Every tensor of a model holding runtime modules as the library's format stores it, and the safetensors
    metadata that format needs (torchao's tensor descriptions)."""
    runtime_layers = {name: m for name, m in module.named_modules() if method_of(m) is not None}
    state = {name: t for name, t in module.state_dict().items() if not _inside(name, runtime_layers)}
    metadata, seen = {}, {t.data_ptr() for t in state.values()}
    for name, layer in runtime_layers.items():
        tensors, meta = code(method_of(layer)).state(name, layer)
        for key, tensor in tensors.items():
            # A tensor the library shares between layers (a code book) is stored under each: the export keeps
            # one copy of a shared tensor, under the first name, which would leave the other layers without it.
            state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
            seen.add(tensor.data_ptr())
        metadata.update(meta)
    return state, metadata


def _inside(name: str, layers: dict) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))


def load_weights(module, folder, qconfig: dict, dtype, device):
    """Load a checkpoint a runtime wrote into `module` (built on meta): every other tensor strictly, as
    `checkpoint.load_into` does, and each quantized layer rebuilt by the library from its stored tensors."""
    from safetensors import safe_open

    from dllm_studio.checkpoint import check_shapes, load_into, tensor_shapes, weight_files
    from dllm_studio.errors import ModelLoadError
    from dllm_studio.quant.storage import linear_at

    runtime = for_quant_method(str(qconfig.get("quant_method")))
    method = qconfig.get("method")
    if method not in runtime.methods:
        raise ModelLoadError(f"config.json: quantization_config.method is {method!r}; {runtime.library} checkpoints "
                             f"written by dLLM Studio name one of {', '.join(runtime.methods)}.")
    reason = runtime.unavailable()
    if reason:
        raise ModelLoadError(f"{folder} holds a {runtime.library} model ({method}), but {reason}.")
    rt = runtime.code()
    shapes = tensor_shapes(folder)
    names = rt.layer_names(shapes, qconfig)
    for name in names:
        linear_at(module, name, f"quantized layer {name}")

    def owner(key: str) -> str | None:
        parts = key.split(".")
        return next((p for i in range(len(parts) - 1, 0, -1) if (p := ".".join(parts[:i])) in names), None)

    expected_layers = {f"{n}.{k}": tuple(v.shape) for n in names for k, v in module.get_submodule(n).state_dict().items()}
    loadable = {k: v for k, v in shapes.items() if owner(k) is None} | expected_layers
    if device.type == "meta":  # describe only: the layers stay full-precision shells
        check_shapes(loadable, {k: tuple(v.shape) for k, v in module.state_dict().items()}, folder)
        return module.to(dtype)
    stash: dict[str, dict] = {n: {} for n in names}

    def keep(name, tensor):
        layer = owner(name)
        if layer is None:
            return tensor
        stash[layer][name[len(layer) + 1:]] = tensor
        return None

    load_into(module, folder, dtype, shapes=loadable, convert=keep)
    metadata = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            metadata.update(f.metadata() or {})
    for name in sorted(names):
        try:
            restored = rt.restore(name, module.get_submodule(name), stash[name], qconfig, metadata, device)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder}: {runtime.library} layer {name} cannot be rebuilt ({exc}).") from None
        setattr(restored, RUNTIME_ATTR, method)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, restored)
    return module.to(device)
