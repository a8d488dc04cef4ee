"""optimum-quanto: int8/int4/int2 weights (`QLinear`), optionally with int8 activations.

Upstream is in maintenance mode (quantization-runtimes.md §2.2). Activations need scales: a calibration pass
over the layer's captured inputs records them, with `Calibration(streamline=False)` so that the reloaded
module runs the same quantizers as the one in memory (streamlining drops output quantizers, and that choice is
not saved). The checkpoint holds each module's state dict (`weight._data`, `weight._scale`, `weight._shift`,
`input_scale`, `output_scale`) and config.json the `quantization_map()` that `requantize()` rebuilds from.
qint4/qint2 weights fail under torch.inference_mode (pytorch#170419), which the models' forward uses, so these
modules run their forward under no_grad with inference mode switched off.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

QTYPES = {8: "qint8", 4: "qint4", 2: "qint2"}


@functools.cache
def _module_class():
    from optimum.quanto import QLinear

    class NoInferenceModeQLinear(QLinear):
        def forward(self, x):
            with torch.inference_mode(False), torch.no_grad():
                return super().forward(x)

    return NoInferenceModeQLinear


def _adopt(module: nn.Module) -> nn.Module:
    module.__class__ = _module_class()
    return module


def convert(linear: nn.Linear, recipe, inputs) -> nn.Module:
    from optimum.quanto import Calibration, QLinear, freeze, qint8, qtypes

    activations = qint8 if recipe.abits == 8 else None
    module = QLinear.from_module(linear, weights=qtypes[QTYPES[recipe.wbits]], activations=activations)
    if activations is not None:
        with Calibration(streamline=False), torch.no_grad():
            module(inputs.to(linear.weight.dtype))
    freeze(module)
    return _adopt(module)


def state(name: str, module: nn.Module) -> tuple[dict, dict]:
    return {f"{name}.{k}": v for k, v in module.state_dict().items()}, {}


def layer_names(shapes: dict, qconfig: dict) -> set[str]:
    return set(qconfig.get("quantization_map", {}))


def restore(name: str, linear: nn.Linear, tensors: dict, qconfig: dict, metadata: dict, device) -> nn.Module:
    from optimum.quanto import requantize

    # A skeleton holding just this layer, on the real device (meta would leave buffers uninitialised).
    holder = nn.Module()
    holder.layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=device)
    requantize(holder, {f"layer.{k}": v for k, v in tensors.items()}, {"layer": qconfig["quantization_map"][name]},
               device=device)
    return _adopt(holder.layer)


def quantization_config(recipe, module: nn.Module) -> dict:
    from optimum.quanto import quantization_map

    return {"quant_method": "quanto", "method": recipe.method, "bits": recipe.wbits,
            "weights": QTYPES[recipe.wbits], "activations": "qint8" if recipe.abits == 8 else "none",
            "quantization_map": quantization_map(module)}


def theory_bits(recipe, in_features: int | None, dtype_bits: int) -> float:
    if recipe.wbits == 8:
        return 8 + dtype_bits / in_features if in_features else 8.0  # a scale per output channel
    return recipe.wbits + 2 * dtype_bits / 128  # a scale and a shift per group of 128
