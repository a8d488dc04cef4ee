"""torchao: int8 weight-only (`Int8WeightOnlyConfig`) and int8 dynamic W8A8 (`Int8DynamicActivationInt8WeightConfig`).

`quantize_` swaps the layer's weight for an `Int8Tensor` (int8 data, a scale per output row, the activation
quantizer for W8A8). safetensors cannot hold a tensor subclass, so the checkpoint stores what torchao's own
safetensors helpers flatten it to: `NAME._weight_qdata`, `NAME._weight_scale`, ... as plain tensors, and the
subclass's description (its type and attributes, as JSON) in the safetensors header under `NAME.weight`. That is
the layout transformers' TorchAoConfig writes; it ties the checkpoint to the torchao version that wrote it.
"""

from __future__ import annotations

import json

import torch
from torch import nn


def _config(abits: int):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return Int8DynamicActivationInt8WeightConfig() if abits == 8 else Int8WeightOnlyConfig()


def convert(linear: nn.Linear, recipe, inputs) -> nn.Module:
    from torchao.quantization import quantize_

    module = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       device="meta", dtype=linear.weight.dtype)
    module.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    quantize_(module, _config(recipe.abits))
    return module


def state(name: str, module: nn.Module) -> tuple[dict, dict]:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict({f"{name}.weight": module.weight.data})
    metadata.pop("tensor_names")  # one list for the whole file; `restore` names the layer's own tensor
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach()
    return tensors, metadata


def layer_names(shapes: dict, qconfig: dict) -> set[str]:
    return {name.removesuffix("._weight_qdata") for name in shapes if name.endswith("._weight_qdata")}


def restore(name: str, linear: nn.Linear, tensors: dict, qconfig: dict, metadata: dict, device) -> nn.Module:
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    key = f"{name}.weight"
    if key not in metadata:
        raise KeyError(f"the safetensors header has no torchao description of {key}")
    flat = {f"{name}.{k}": v.to(device) for k, v in tensors.items() if k != "bias"}
    weights, leftover = unflatten_tensor_state_dict(flat, {key: metadata[key], "tensor_names": json.dumps([key])})
    if leftover or key not in weights:
        raise ValueError(f"unexpected tensors {', '.join(sorted(leftover)) or 'none'} beside {key}")
    module = nn.Linear(linear.in_features, linear.out_features, bias="bias" in tensors, device="meta")
    module.weight = nn.Parameter(weights[key], requires_grad=False)
    if "bias" in tensors:
        module.bias = nn.Parameter(tensors["bias"].to(device), requires_grad=False)
    return module


def quantization_config(recipe, module: nn.Module) -> dict:
    import torchao

    return {"quant_method": "torchao", "method": recipe.method, "bits": recipe.wbits,
            "quant_type": type(_config(recipe.abits)).__name__, "torchao_version": torchao.__version__}


def theory_bits(recipe, in_features: int | None, dtype_bits: int) -> float:
    return 8 + 2 * dtype_bits / in_features if in_features else 8.0  # a scale and a zero point per output row
