"""bitsandbytes: NF4 and FP4 (`Linear4bit`) and LLM.int8 (`Linear8bitLt`), stored as transformers stores them.

The checkpoint holds each module's own state dict: for 4-bit the packed `weight` (uint8) with `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4`
(or `__fp4`); for int8 the int8 `weight`, its per-row `SCB` and `weight_format`. 4-bit always computes in bf16:
with fp32 compute these layers run slower than the dense fp32 layer (quantization-runtimes.md §2.1).
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKSIZE = 64
THRESHOLD = 6.0  # LLM.int8: input columns with a magnitude above this stay in 16-bit
COMPUTE_DTYPE = torch.bfloat16
QUANT_TYPES = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}


def convert(linear: nn.Linear, recipe, inputs) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.detach().float()  # bitsandbytes rounds from the weight as it is, at full precision
    bias = linear.bias is not None
    if recipe.method == "bnb-int8":
        with torch.device("meta"):
            module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                         threshold=THRESHOLD)
        module.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        with torch.device("meta"):
            module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=COMPUTE_DTYPE,
                                       compress_statistics=True, quant_type=QUANT_TYPES[recipe.method],
                                       quant_storage=torch.uint8)
        module.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                                          quant_type=QUANT_TYPES[recipe.method], blocksize=BLOCKSIZE, module=module)
    if bias:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to(linear.weight.device)  # bitsandbytes quantizes on the move to a real device


def state(name: str, module: nn.Module) -> tuple[dict, dict]:
    return {f"{name}.{k}": v for k, v in module.state_dict().items()}, {}


def layer_names(shapes: dict, qconfig: dict) -> set[str]:
    marker = ".SCB" if qconfig.get("load_in_8bit") else ".weight.quant_state.bitsandbytes__"
    return {name.split(marker)[0] for name in shapes if marker in name}


def restore(name: str, linear: nn.Linear, tensors: dict, qconfig: dict, metadata: dict, device) -> nn.Module:
    import bitsandbytes as bnb

    bias = "bias" in tensors
    with torch.device("meta"):
        if qconfig.get("load_in_8bit"):
            module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                         threshold=float(qconfig.get("llm_int8_threshold", THRESHOLD)))
        else:
            module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=COMPUTE_DTYPE,
                                       compress_statistics=True, quant_type=qconfig["bnb_4bit_quant_type"],
                                       quant_storage=torch.uint8)
    if qconfig.get("load_in_8bit"):
        weight = bnb.nn.Int8Params(tensors["weight"].to(device), requires_grad=False, has_fp16_weights=False)
        weight.CB, weight.SCB = weight.data, tensors["SCB"].to(device)
        module.weight = weight
    else:
        stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
        module.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device=device, module=module)
    if bias:
        module.bias = nn.Parameter(tensors["bias"].to(device), requires_grad=False)
    return module


def quantization_config(recipe, module: nn.Module) -> dict:
    """transformers' BitsAndBytesConfig fields, plus the method and bits dLLM Studio shows."""
    four_bit = recipe.method != "bnb-int8"
    return {"quant_method": "bitsandbytes", "method": recipe.method, "bits": recipe.wbits,
            "load_in_4bit": four_bit, "load_in_8bit": not four_bit,
            "bnb_4bit_quant_type": QUANT_TYPES.get(recipe.method, "fp4"), "bnb_4bit_use_double_quant": four_bit,
            "bnb_4bit_compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": THRESHOLD, "llm_int8_skip_modules": list(recipe.skip)}


def theory_bits(recipe, in_features: int | None, dtype_bits: int) -> float:
    if recipe.method == "bnb-int8":
        return 8 + 32 / in_features if in_features else 8.0  # an fp32 scale (SCB) per row
    # 4-bit codes, a uint8 absmax per block, and (double quant) an fp32 scale per 256 absmax values
    return 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * 256)
