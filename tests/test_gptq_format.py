"""GPTQ-format exports decode, in the peers' own arithmetic, to exactly the weights the quantized model holds.

The peers (transformers + optimum + gptqmodel, GPTQModel.load; see quantization-runtimes.md §8) read a v1
folder (`checkpoint_format: "gptq"`) by adding 1 to every zero-point field with one plain add per packed int32
word, so a full field carries into its neighbour; a v2 folder (`"gptq_v2"`) is read as stored.
"""

import json

import numpy as np
import pytest
import torch

from dllm_studio import jobs
from dllm_studio.errors import ModelLoadError
from dllm_studio.models import load_model
from dllm_studio.quant.export import save_quantized, verify
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.storage import to_gptq

BLOCK0 = "model.transformer.blocks.0."


def _fields(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first n `bits`-bit fields of each row of uint32 words, read as one little-endian bit stream
    (a 3-bit field may straddle two words)."""
    rows = np.zeros((words.shape[0], n), dtype=np.int64)
    for k in range(n):
        word, offset = divmod(k * bits, 32)
        value = words[:, word].astype(np.int64) >> offset
        if offset + bits > 32:
            value |= words[:, word + 1].astype(np.int64) << (32 - offset)
        rows[:, k] = value & ((1 << bits) - 1)
    return rows


def _peer_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> np.ndarray:
    """Zero points (groups, out) as the peers decode them."""
    words = qzeros.numpy().view(np.uint32)
    if checkpoint_format == "gptq_v2":
        return _fields(words, bits, out_features)
    assert checkpoint_format == "gptq"
    if bits == 3:  # fields straddle words, so the CUDA kernels add 1 per field instead, without wrapping
        return _fields(words, bits, out_features) + 1
    one_per_field = sum(1 << shift for shift in range(0, 32, bits))  # 0x11111111 at 4 bits
    carried = ((words.astype(np.uint64) + one_per_field) % (1 << 32)).astype(np.uint32)  # int32 add, wrapping
    return _fields(carried, bits, out_features)


def _peer_weight(tensors: dict, bits: int, checkpoint_format: str) -> torch.Tensor:
    """The dequantized weight (out, in) a peer computes from a layer's GPTQ tensors."""
    qweight = tensors["qweight"].numpy().view(np.uint32)
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = _fields(np.ascontiguousarray(qweight.T), bits, in_features)  # (out, in)
    zeros = _peer_zeros(tensors["qzeros"], bits, out_features, checkpoint_format).T  # (out, groups)
    scales = tensors["scales"].float().numpy().T
    g = tensors["g_idx"].numpy()
    return torch.from_numpy(((codes - zeros[:, g]) * scales[:, g]).astype(np.float32))


@pytest.fixture(scope="module")
def nonnegative_channels(llada_dir):
    """The tiny LLaDA with every other output channel of block 0's linears made non-negative, so their groups
    take zero point 0 on the asymmetric grid (the case v1 cannot store)."""
    model = load_model(llada_dir, dtype="float32")
    with torch.no_grad():
        for name, module in model.module.named_modules():
            if name.startswith(BLOCK0) and isinstance(module, torch.nn.Linear):
                module.weight[::2].abs_()
    return model


def _exported(model, tmp_path, recipe):
    from safetensors.torch import load_file

    result = jobs.run(quantize(model, recipe))
    out = save_quantized(result.model, tmp_path / "gptq", fmt="gptq")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    return result.model, out, qconfig, load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_peers_decode_exactly_the_weights_the_model_holds(nonnegative_channels, tmp_path, bits, symmetric):
    recipe = QuantRecipe(method="rtn", wbits=bits, group_size=32, symmetric=symmetric, calib_samples=2, seq_len=32,
                         skip=("head", "*.blocks.1.*"))
    quantized, out, qconfig, tensors = _exported(nonnegative_channels, tmp_path, recipe)
    layers = {n: m for n, m in quantized.module.named_modules() if isinstance(m, QuantLinear) and n.startswith(BLOCK0)}
    assert layers
    zero_groups = sum(int((layer.zeros() == 0).sum()) for layer in layers.values())
    assert (zero_groups > 0) is not symmetric  # the asymmetric grid puts the non-negative channels at zero 0
    for name, layer in layers.items():
        own = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert own["qweight"].dtype == own["qzeros"].dtype == torch.int32
        assert own["qweight"].shape == (layer.in_features * bits // 32, layer.out_features)
        assert torch.equal(_peer_weight(own, bits, qconfig["checkpoint_format"]), layer.dequantize(torch.float32)), name
    assert qconfig["checkpoint_format"] == ("gptq" if symmetric else "gptq_v2") and qconfig["sym"] is symmetric
    # Our own reader reads the folder back to the same model.
    report = verify(quantized, out)
    assert report["max_abs_logit_diff"] == 0.0 and report["argmax_agrees"]


def test_the_v1_layout_refuses_a_zero_point_it_cannot_store():
    q = torch.zeros(8, 32, dtype=torch.uint8)
    layer = QuantLinear.from_codes(q, torch.ones(8, 1), torch.tensor([[0.0], *[[8.0]] * 7]), 4, None)
    with pytest.raises(ValueError, match="zero point 0"):
        to_gptq(layer, "gptq")
    assert to_gptq(layer, "gptq_v2")["qzeros"].numpy().view(np.uint32)[0, 0] == 0x88888880


def test_our_reader_takes_both_layouts_and_refuses_others(nonnegative_channels, tmp_path):
    recipe = QuantRecipe(method="rtn", wbits=4, group_size=32, calib_samples=2, seq_len=32,
                         skip=("head", "*.blocks.1.*"))
    quantized, out, _, _ = _exported(nonnegative_channels, tmp_path, recipe)
    ids = torch.tensor([quantized.chat_ids([{"role": "user", "content": "Hi"}])])
    assert torch.equal(load_model(out, dtype="float32").forward(ids), quantized.forward(ids))
    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    qconfig["format"] = qconfig.pop("checkpoint_format")  # the key's newer name in transformers' GPTQConfig
    (out / "config.json").write_text(json.dumps(config))
    assert torch.equal(load_model(out, dtype="float32").forward(ids), quantized.forward(ids))
    qconfig["format"] = "marlin"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'marlin' is not supported"):
        load_model(out, dtype="float32")
