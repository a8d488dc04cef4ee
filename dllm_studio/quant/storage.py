"""Quantized checkpoints on disk: the native layout and the GPTQ format, written and read back.

Native (`quant_method: "dllm_studio"`): each quantized linear's `QuantLinear` buffers as they are held
in memory (uint8 codes packed along the input dimension, fp16 scales, packed zero points, g_idx only
with act-order; or, for a non-uniform grid, the codes and an fp16 codebook per row instead of scales and zero
points); every other tensor as the original model had it.

GPTQ (`quant_method: "gptq"`), the layout transformers, GPTQModel, vLLM and SGLang read: `qweight` int32
(in * bits / 32, out) packed along the input dimension, `qzeros` int32 (groups, out * bits / 32) packed along
the output dimension, `scales` fp16 (groups, out) and `g_idx` int32 (in,). Both pack one little-endian bit
stream (see `packing`), so converting between them is a transpose and a reinterpretation of bytes. The
`checkpoint_format` decides what a `qzeros` field holds: zero - 1 in v1 (`"gptq"`), the zero point itself in
v2 (`"gptq_v2"`); `gptq_checkpoint_format` says which one an export is written in, and why.
"""

from __future__ import annotations

import torch
from torch import nn

from dllm_studio.errors import ModelLoadError
from dllm_studio.quant import runtimes
from dllm_studio.quant.packing import pack, packed_size, unpack
from dllm_studio.quant.qlinear import ACT_BITS, QuantLinear

QUANT_BUFFERS = ("qweight", "scales", "qzeros", "g_idx", "codebook")
TRANSFORM = "transform"  # a QuantLinear's `InputTransform` child: `<layer>.transform.<part>`
# What each GPTQ layout subtracts from a zero point before packing it.
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


STORED_BITS = (2, 3, 4, 8)


def check_qconfig(qconfig: object) -> None:
    """Refuse a `quantization_config` whose numbers no layer can be built from, naming the field."""
    where = "config.json: quantization_config"
    if not isinstance(qconfig, dict):
        raise ModelLoadError(f"{where} must be an object, not {type(qconfig).__name__}.")
    bits, group = qconfig.get("bits"), qconfig.get("group_size", -1)
    if type(bits) is not int or bits not in STORED_BITS:
        raise ModelLoadError(f"{where}.bits is {bits!r}; quantized weights have "
                             f"{', '.join(map(str, STORED_BITS))} bits.")
    layer_bits = qconfig.get("layer_bits", {})  # a mixed-precision model: layers whose bits differ from `bits`
    if not isinstance(layer_bits, dict) or not all(isinstance(k, str) and type(v) is int and v in STORED_BITS
                                                   for k, v in layer_bits.items()):
        raise ModelLoadError(f"{where}.layer_bits must map layer names to bits "
                             f"({', '.join(map(str, STORED_BITS))}), not {layer_bits!r}.")
    if type(group) is not int or not (group == -1 or group > 0):
        raise ModelLoadError(f"{where}.group_size is {group!r}; it must be a positive number of columns, "
                             "or -1 for one group per output channel.")
    if not isinstance(qconfig.get("desc_act", False), bool):
        raise ModelLoadError(f"{where}.desc_act is {qconfig['desc_act']!r}, not true or false.")
    act_bits, act_clip = qconfig.get("act_bits", 16), qconfig.get("act_clip", 1.0)
    if type(act_bits) is not int or act_bits not in ACT_BITS:
        raise ModelLoadError(f"{where}.act_bits is {act_bits!r}; activations are quantized to "
                             f"{', '.join(map(str, ACT_BITS))} bits (16: not at all).")
    if type(act_clip) not in (int, float) or not 0 < act_clip <= 1:
        raise ModelLoadError(f"{where}.act_clip is {act_clip!r}; the activation clip ratio must be above 0 and "
                             "at most 1.")
    shared = qconfig.get("shared_transforms", {})
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise ModelLoadError(f"{where}.shared_transforms must map layer names to layer names, not {shared!r}.")


def quant_format(qconfig: dict) -> str:
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "dllm_studio":
        return "native"
    if runtimes.for_quant_method(method) is not None:
        return "runtime"  # a library's own layers (`runtimes.load_weights`)
    if method == "gptq":
        if _checkpoint_format(qconfig) not in GPTQ_ZERO_OFFSETS:
            raise ModelLoadError(f"GPTQ checkpoint format {_checkpoint_format(qconfig)!r} is not supported "
                                 "(only the 'gptq' (v1) and 'gptq_v2' layouts).")
        return "gptq"
    raise ModelLoadError(f"quantization method {qconfig.get('quant_method')!r} in config.json is not one dLLM "
                         "Studio reads (it reads its own checkpoints, the GPTQ format and the bitsandbytes, optimum-quanto and "
                         "torchao checkpoints it writes).")


def install_shells(module: nn.Module, qconfig: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Replace every nn.Linear whose checkpoint holds a `qweight` by an empty QuantLinear of the right shape
    (with the config's activation bits and clip, and the `InputTransform` parts the checkpoint holds for it)."""
    check_qconfig(qconfig)
    fmt = quant_format(qconfig)
    bits, layer_bits = int(qconfig["bits"]), qconfig.get("layer_bits", {})
    group = int(qconfig.get("group_size", -1))
    desc_act = bool(qconfig.get("desc_act", False))
    act_bits, act_clip = qconfig.get("act_bits", 16), float(qconfig.get("act_clip", 1.0))
    for name in [n[: -len(".qweight")] for n in shapes if n.endswith(".qweight")]:
        linear = linear_at(module, name, f"quantized tensor {name}.qweight")
        act_order = f"{name}.g_idx" in shapes if fmt == "native" else desc_act
        prefix = f"{name}.{TRANSFORM}."
        parts = {n[len(prefix):]: shape for n, shape in shapes.items() if n.startswith(prefix)}
        transform = None
        if parts:
            from dllm_studio.quant.transforms import InputTransform  # only models with rotations need it

            transform = InputTransform.shell(linear.in_features, parts, device="meta")
        codebook = f"{name}.codebook" in shapes  # a non-uniform grid (twin-log): one group per row by construction
        if codebook and fmt != "native":
            raise ModelLoadError(f"{name}.codebook: codebook layers are stored only in dLLM Studio's native format.")
        shell = QuantLinear(linear.in_features, linear.out_features, layer_bits.get(name, bits), None if codebook or group <= 0 else group,
                            bias=linear.bias is not None, act_order=act_order and not codebook, act_bits=act_bits,
                            act_clip=act_clip, transform=transform, codebook=codebook, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, shell)
    for name, owner in qconfig.get("shared_transforms", {}).items():  # stored once, under the owner's name
        alias, source = (_quant_layer(module, n, "shared_transforms") for n in (name, owner))
        if source.transform is None:
            raise ModelLoadError(f"config.json: quantization_config.shared_transforms names {owner}, which holds no "
                                 "transform in the weights.")
        alias.transform = source.transform


def _quant_layer(module: nn.Module, name: str, what: str) -> QuantLinear:
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        layer = None
    if not isinstance(layer, QuantLinear):
        raise ModelLoadError(f"config.json: quantization_config.{what} names {name}, not a quantized layer.")
    return layer


def linear_at(module: nn.Module, name: str, what: str) -> nn.Linear:
    """The nn.Linear a checkpoint's quantized tensors name (`what`, for the error), or a clear refusal."""
    try:
        linear = module.get_submodule(name)
    except AttributeError:
        raise ModelLoadError(f"{what} names no layer of this architecture.") from None
    if not isinstance(linear, nn.Linear):
        raise ModelLoadError(f"{what} belongs to {type(linear).__name__}, not a linear layer.")
    return linear


def keeps_dtype(module: nn.Module, name: str) -> bool:
    """Quantized buffers keep their stored dtypes (uint8, fp16, int32), and so do a transform's parts (fp32:
    rounded rotations would no longer undo each other); other tensors take the model's."""
    owner, _, attr = name.rpartition(".")
    layer, _, child = owner.rpartition(".")
    if child == TRANSFORM and isinstance(module.get_submodule(layer), QuantLinear):
        return True
    return attr in QUANT_BUFFERS and isinstance(module.get_submodule(owner), QuantLinear)


# ---- GPTQ format ---------------------------------------------------------------------------------

def gptq_checkpoint_format(symmetric: bool) -> str:
    """The GPTQ layout an export is written in: v1 (`"gptq"`) for a symmetric grid, v2 (`"gptq_v2"`) for an
    asymmetric one, so that every reader decodes exactly the zero points we store.

    v1 stores zero - 1, so an asymmetric group whose weights are all >= 0 (zero point 0) has no v1 encoding:
    written as 2^b - 1, transformers + optimum + gptqmodel convert v1 to v2 with one add per int32 word
    (0x11111111 at 4 bits), and the carry changes the neighbouring output channel's zero point; a per-field + 1
    reader gets 2^b; and GPTQModel.load refuses asymmetric v1 from any producer but itself
    (quantization-runtimes.md §8). v2 stores the zero point as is; optimum hands `checkpoint_format` to
    gptqmodel, which skips the conversion for `gptq_v2`, and GPTQModel.load asks for exactly that (§8).
    Keeping v1 with every zero point >= 1 instead would mean quantizing asymmetric grids differently for
    this one export format, chosen only after quantization, and v1 asymmetric would still be refused by
    GPTQModel. A symmetric grid's zero point is 2^(b-1) >= 1, which v1 holds exactly and every GPTQ reader,
    including v1-only ones, decodes as stored (§8).
    """
    return "gptq" if symmetric else "gptq_v2"


def to_gptq(layer: QuantLinear, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The layer's tensors in a GPTQ layout (`GPTQ_ZERO_OFFSETS`; names relative to the layer)."""
    bits = layer.bits
    if layer.in_features * bits % 32 or layer.out_features * bits % 32:
        raise ValueError(f"GPTQ packing needs in/out features whose bit count divides into 32-bit words "
                         f"({layer.in_features}x{layer.out_features} at {bits} bits)")
    qweight = layer.stored_qweight().contiguous().view(torch.int32).T.contiguous()  # same bit stream, int32 words
    stored = layer.zeros().T.to(torch.int32) - GPTQ_ZERO_OFFSETS[checkpoint_format]
    if (stored < 0).any():  # would wrap to 2^bits - 1, which readers decode as another zero point
        raise ValueError("a zero point 0 has no encoding in the GPTQ v1 layout (it stores zero - 1); "
                         "write the gptq_v2 layout")
    qzeros = pack(stored, bits).contiguous().view(torch.int32)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": layer.scales.T.contiguous(),
               "g_idx": layer.column_groups().to(torch.int32)}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()  # at the model's dtype, so a reload computes exactly the same
    return tensors


def gptq_shapes(shapes: dict[str, tuple[int, ...]], qconfig: dict) -> dict[str, tuple[int, ...]]:
    """Shapes a GPTQ checkpoint's tensors take once converted to the native layout."""
    bits, desc_act = int(qconfig["bits"]), bool(qconfig.get("desc_act", False))
    native = {}
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        if attr == "qweight":
            native[name] = (shape[1], shape[0] * 4)
        elif attr == "qzeros":
            groups, words = shape
            native[name] = (packed_size(words * 32 // bits * groups, bits),)
        elif attr == "scales":
            native[name] = (shape[1], shape[0])
        elif attr == "g_idx" and not desc_act:
            continue
        else:
            native[name] = shape
    return native


def from_gptq(name: str, tensor: torch.Tensor, qconfig: dict) -> torch.Tensor | None:
    """One GPTQ tensor in the native layout (None: a tensor the native layout does not keep)."""
    bits, desc_act = int(qconfig["bits"]), bool(qconfig.get("desc_act", False))
    attr = name.rpartition(".")[2]
    if attr == "qweight":
        return tensor.T.contiguous().view(torch.uint8)
    if attr == "qzeros":
        out_features = tensor.shape[1] * 32 // bits
        stored = unpack(tensor.contiguous().view(torch.uint8), bits, out_features).to(torch.int32)
        # Wrapping per field (never carrying) also reads back the 2^bits - 1 that v1 writers store for zero 0.
        zeros = (stored + GPTQ_ZERO_OFFSETS[_checkpoint_format(qconfig)]) & ((1 << bits) - 1)
        return pack(zeros.T.contiguous().reshape(-1), bits)
    if attr == "scales":
        return tensor.T.contiguous()
    if attr == "g_idx" and not desc_act:
        return None
    return tensor


def _checkpoint_format(qconfig: dict) -> str:
    """The GPTQ layout a config declares (`format` is transformers' newer name for it; v1 when absent)."""
    return str(qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq").lower()
