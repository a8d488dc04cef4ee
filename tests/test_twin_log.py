"""Twin-log (TLQ) codes: better than RTN on long-tailed weights, stored as packed codes + a per-row codebook,
decoded by the dequantize kernel only, exported natively and reloaded bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dllm_studio import jobs
from dllm_studio.errors import QuantizationError
from dllm_studio.models import load_model
from dllm_studio.quant import kernels
from dllm_studio.quant.export import check_format, save_quantized
from dllm_studio.quant.grid import Grid, dequantize, rtn
from dllm_studio.quant.kernels import dequant
from dllm_studio.quant.kernels.base import CODEBOOK_REASON, fake_quantize_activations
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.storage import check_qconfig
from dllm_studio.quant.twin_log import ETA_RMS, ETAS, PERCENTILES, codebook_dequantize, twin_log

BLOCK0 = "model.transformer.blocks.0."
GPTQ_REFUSAL = "Twin-log \\(TLQ\\) codes are not uniform"


def _long_tailed(rows=64, cols=256, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def _relative_error(w_hat, w):
    return float((w_hat - w).square().sum() / w.square().sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_twin_log_beats_per_channel_rtn_on_long_tailed_weights(bits):
    w = _long_tailed()
    codes, codebook = twin_log(w, bits)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) < 1 << bits
    assert codebook.dtype == torch.float16 and codebook.shape == (w.shape[0], 1 << bits)
    q, scales, zeros = rtn(w, Grid(bits), None)
    tlq = _relative_error(codebook_dequantize(codes, codebook), w)
    assert tlq < 0.75 * _relative_error(dequantize(q, scales, zeros, None), w)


def _tlq_reference(w: torch.Tensor, bits: int) -> torch.Tensor:
    """TLQ's codes row by row, as LRQ-DiT writes it: every (eta, percentile) grid priced on the weights themselves."""
    levels = 1 << (bits - 1)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for r, row in enumerate(w):
        best = None
        for factor in ETAS:
            eta = factor * float(row.square().mean().sqrt()) / ETA_RMS
            total, rounded = 0.0, []
            for side in (row > 0, row < 0):
                a = row[side].abs()
                L = torch.log2(a + eta)
                options = []
                for p in PERCENTILES:
                    step = max(float((torch.quantile(L, p) - L.min()) / (levels - 1)), 1e-8)
                    zero = round(-float(L.min()) / step)
                    q = torch.clamp(torch.round(L / step) + zero, 0, levels - 1)
                    options.append((float((torch.exp2((q - zero) * step) - eta - a).square().sum()), q))
                err, q = min(options, key=lambda o: o[0])
                total += err
                rounded.append(q)
            if best is None or total < best[0]:
                best = (total, rounded)
        codes[r, row > 0] = (levels + best[1][0]).to(torch.uint8)
        codes[r, row < 0] = (levels - 1 - best[1][1]).to(torch.uint8)
    return codes


@pytest.mark.parametrize("bits", [3, 4])
def test_the_fast_search_finds_tlqs_codes(bits):
    w = _long_tailed(12, 64, seed=1)
    assert torch.equal(twin_log(w, bits)[0], _tlq_reference(w, bits))


def test_codes_are_tlq_sign_sides_and_zero_takes_the_level_nearest_zero():
    w = _long_tailed(8, 64)
    w[0, :5] = 0
    w[1] = 0  # an all-zero row decodes exactly
    w[2] = w[2].abs()  # no negative side
    codes, codebook = twin_log(w, 3)
    half = 4
    nonzero = w != 0
    assert torch.equal((codes[nonzero] >= half), (w[nonzero] > 0))  # negatives index the first half
    assert torch.equal(codebook[1], torch.zeros(8, dtype=torch.float16))
    assert torch.equal(codebook[2, :half], torch.zeros(half, dtype=torch.float16))
    nearest = codebook[0, half - 1:half + 1].float().abs().argmin() + half - 1
    assert torch.equal(codes[0, :5], torch.full((5,), int(nearest), dtype=torch.uint8))
    assert torch.equal(codebook_dequantize(codes, codebook)[1], torch.zeros(64))


def test_from_codebook_round_trips_codes_and_dequantizes_exactly():
    w = _long_tailed(48, 96)
    codes, codebook = twin_log(w, 3)
    bias = torch.randn(48)
    layer = QuantLinear.from_codebook(codes, codebook, 3, bias=bias)
    assert torch.equal(layer.codes(), codes) and torch.equal(layer.codebook, codebook)
    assert torch.equal(layer.dequantize(), codebook_dequantize(codes, codebook))
    assert layer.scales is None and layer.qzeros is None and layer.g_idx is None and layer.groups == 1
    assert set(layer.state_dict()) == {"qweight", "codebook", "bias"}
    assert layer.nbytes() == 48 * 36 + 48 * 8 * 2 + 48 * 4  # 3-bit codes, fp16 codebook, fp32 bias
    assert "codebook=True" in repr(layer)
    assert layer.to(torch.bfloat16).codebook.dtype == torch.float16  # the bias follows the model, not the codebook
    with pytest.raises(ValueError, match="no zero points"):
        layer.zeros()


def test_dequant_kernel_decodes_codebook_tiles(monkeypatch):
    monkeypatch.setattr(dequant, "TILE_ELEMENTS", 16 * 64)  # 16-row tiles: 40 rows take three, the last short
    codes, codebook = twin_log(_long_tailed(40, 64), 4)
    layer = QuantLinear.from_codebook(codes, codebook, 4)
    kernel = dequant.Dequant(layer)
    assert kernel.rows == 16
    x = torch.randn(5, 64)
    torch.testing.assert_close(kernel(x), x @ layer.dequantize().T, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_integer_kernels_refuse_codebook_layers(bits):
    codes, codebook = twin_log(_long_tailed(64, 256), bits)
    layer = QuantLinear.from_codebook(codes, codebook, bits)
    reasons = kernels.runnable(layer, torch.device("cpu"))
    assert reasons == {"dequant": None, "int4": CODEBOOK_REASON, "int8": CODEBOOK_REASON, "w8a8": CODEBOOK_REASON}
    assert kernels.shape(layer) == f"256->64 w{bits}a16 codebook"
    uniform = QuantLinear.from_codes(*rtn(_long_tailed(64, 256), Grid(bits), None), bits, None)
    assert kernels.shape(uniform) == f"256->64 w{bits}a16 per-channel"
    assert kernels.kernel_for(layer, torch.device("cpu"), torch.float32, 8).name == "dequant"
    module = torch.nn.Sequential(layer, uniform)
    assert kernels.prepare(module, torch.float32) == 2  # the two grids are two shapes
    row = kernels.plan(module, torch.device("cpu"), torch.float32)[0]
    assert row == {"shape": kernels.shape(layer), "layers": 1, "runnable": ["dequant"],
                   "chosen": {b: "dequant" for b in kernels.BUCKETS}, "simulated": False}
    layer(torch.randn(256, 256))
    assert kernels.describe(kernels.choices(module)) == "dequant x1 at 32 tokens; dequant x1 at 256 tokens"


def test_codebook_layers_with_quantized_activations_run_simulated_in_the_dequant_kernel():
    codes, codebook = twin_log(_long_tailed(64, 256), 4)
    layer = QuantLinear.from_codebook(codes, codebook, 4, act_bits=4, act_clip=0.9)  # ARS: W4A4
    assert kernels.runnable(layer, torch.device("cpu"))["w8a8"] == CODEBOOK_REASON
    assert kernels.shape(layer) == "256->64 w4a4 codebook clip0.9" and kernels.simulated(layer)
    x = torch.randn(6, 256)
    torch.testing.assert_close(layer(x), fake_quantize_activations(x, 4, 0.9) @ layer.dequantize().T,
                               atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def with_codebooks(llada):
    """The tiny LLaDA quantized with RTN W3 per-channel, block 0's linears then replaced by twin-log layers."""
    result = jobs.run(quantize(llada, QuantRecipe(method="rtn", wbits=3, group_size=None, calib_samples=2, seq_len=32)))
    model = result.model
    replaced = []
    for name, module in list(model.module.named_modules()):
        if name.startswith(BLOCK0) and isinstance(module, QuantLinear):
            original = llada.module.get_submodule(name)
            layer = QuantLinear.from_codebook(*twin_log(original.weight, 3), 3, bias=original.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.module.get_submodule(parent), child, layer)
            replaced.append(name)
    assert replaced
    return model, replaced


def test_codebook_layers_export_natively_and_reload_bit_identical(llada, with_codebooks, tmp_path):
    model, replaced = with_codebooks
    out = save_quantized(model, tmp_path / "tlq")
    stored = load_file(str(out / "model.safetensors"))
    assert all(stored[f"{name}.codebook"].dtype == torch.float16 for name in replaced)
    assert not any(f"{name}.scales" in stored for name in replaced)
    check_qconfig(json.loads((out / "config.json").read_text())["quantization_config"])
    reloaded = load_model(out, dtype="float32")
    for name in replaced:
        a, b = model.module.get_submodule(name), reloaded.module.get_submodule(name)
        assert b.codebook is not None and b.scales is None
        assert torch.equal(a.codebook, b.codebook) and torch.equal(a.stored_qweight(), b.stored_qweight())
    ids = torch.tensor([llada.chat_ids([{"role": "user", "content": "What is 2 plus 3?"}])])
    assert torch.equal(reloaded.forward(ids), model.forward(ids))
    described = load_model(out, dtype="float32", device="meta")  # `info`: shells and kernel plan, no weights read
    shapes = [row["shape"] for row in kernels.plan(described.module, torch.device("cpu"), torch.float32)]
    assert any(shape.endswith("w3a16 codebook") for shape in shapes)
    assert any(shape.endswith("w3a16 per-channel") for shape in shapes)


def test_gptq_export_refuses_codebook_layers_and_tlq_recipes(with_codebooks, tmp_path):
    model, _ = with_codebooks
    with pytest.raises(QuantizationError, match=GPTQ_REFUSAL):
        save_quantized(model, tmp_path / "gptq", fmt="gptq")
    assert not (tmp_path / "gptq").exists()
    for method in ("tlq", "ars"):  # refused from the recipe alone, before a model exists
        with pytest.raises(QuantizationError, match=GPTQ_REFUSAL):
            check_format(QuantRecipe(method=method, wbits=3, group_size=None), "gptq")
        check_format(QuantRecipe(method=method, wbits=3, group_size=None), "native")


def test_check_qconfig_accepts_a_twin_log_config():
    for bits in (3, 4):
        check_qconfig({"quant_method": "dllm_studio", "method": "tlq", "bits": bits, "group_size": -1,
                       "sym": False, "desc_act": False, "skip": ["head"], "format": "packed-uint8"})
