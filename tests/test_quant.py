"""Quantization core: packing, the integer grid, GPTQ and AWQ against RTN, QuantLinear storage."""

import pytest
import torch
import torch.nn.functional as F

from dllm_studio.errors import QuantizationError
from dllm_studio.quant import awq
from dllm_studio.quant.gptq import Hessian, gptq
from dllm_studio.quant.grid import Grid, dequantize, rtn
from dllm_studio.quant.packing import pack, packed_size, unpack
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [8, 24, 13])
def test_pack_roundtrip_and_density(bits, n):
    values = torch.randint(0, 2**bits, (5, n), generator=torch.Generator().manual_seed(bits))
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_size(n, bits))
    assert packed_size(64, bits) == 64 * bits // 8  # b bits per value, nothing wasted
    assert torch.equal(unpack(packed, bits, n).long(), values)


def test_pack_is_a_little_endian_bit_stream():
    # Two 4-bit values per byte, low nibble first; 3-bit values cross byte boundaries.
    assert pack(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    stream = sum(v << (3 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]), 3).tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_at_most_half_a_step(symmetric):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    grid = Grid(4, symmetric)
    q, scales, zeros = rtn(w, grid, 64)
    assert q.max() <= 15 and scales.shape == (16, 4)
    err = (dequantize(q, scales, zeros, 64) - w).abs()
    step = scales.repeat_interleave(64, dim=1)
    assert (err <= step / 2 + 1e-6).all() if not symmetric else (err <= step).all()


def test_rtn_handles_a_partial_last_group():
    w = torch.randn(4, 80)
    q, scales, zeros = rtn(w, Grid(4), 32)
    assert scales.shape == (4, 3)
    assert (dequantize(q, scales, zeros, 32) - w).abs().max() < 0.5


def _planted(seed=0, n=2048, d_in=256, d_out=96):
    """Correlated inputs (a low-rank part plus noise) with a few outlier channels (x40), as real LLM
    activations have, and a random layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g) @ torch.randn(32, d_in, generator=g) / 4 + 0.3 * torch.randn(n, d_in, generator=g)
    x[:, [3, 77, 200]] *= 40
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return x, w


def _error(x, w, w_hat):
    return float((x @ w_hat.T - x @ w.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_and_awq_beat_rtn_on_planted_outliers(bits):
    x, w = _planted()
    grid = Grid(bits)
    rtn_err = _error(x, w, dequantize(*rtn(w, grid, 128), 128))
    h = Hessian(w.shape[1])
    for chunk in x.split(512):
        h.add(chunk)
    q, scales, zeros, g_idx = gptq(w, h.H, grid, 128)
    gptq_err = _error(x, w, dequantize(q, scales, zeros, 128))
    s = awq.search_scale(x, [w], grid, 128)
    clip = awq.search_clip(x / s, w * s, grid, 128)
    awq_err = _error(x, w, dequantize(*rtn(w * s, grid, 128, clip), 128) / s)
    assert gptq_err < 0.6 * rtn_err
    assert awq_err < 0.8 * rtn_err


def test_gptq_act_order_records_column_groups():
    x, w = _planted(1)
    h = Hessian(w.shape[1])
    h.add(x)
    q, scales, zeros, g_idx = gptq(w, h.H, Grid(4), 64, act_order=True)
    assert g_idx.shape == (256,) and sorted(torch.bincount(g_idx.long()).tolist()) == [64] * 4
    # The outlier channels (largest H_ii) are swept first, so they open group 0.
    assert set(g_idx[[3, 77, 200]].tolist()) == {0}
    layer = QuantLinear.from_codes(q, scales, zeros, 4, 64, g_idx=g_idx)
    assert _error(x, w, layer.dequantize()) < _error(x, w, dequantize(*rtn(w, Grid(4), 64), 64))


def test_hessian_is_the_running_mean():
    x = torch.randn(100, 8)
    h = Hessian(8)
    h.add(x[:30])
    h.add(x[30:])
    assert torch.allclose(h.H, 2 / 100 * x.T @ x, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_holds_packed_bytes_and_computes_with_them(bits):
    w = torch.randn(64, 256)
    bias = torch.randn(64)
    q, scales, zeros = rtn(w, Grid(bits), 128)
    layer = QuantLinear.from_codes(q, scales, zeros, bits, 128, bias=bias)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 64 * 256 * bits // 8
    assert layer.scales.dtype == torch.float16
    weight_bytes = layer.nbytes() - bias.numel() * 4
    bits_per_weight = weight_bytes * 8 / w.numel()
    assert bits_per_weight == pytest.approx(bits + (16 + bits) / 128, rel=0.03)  # zero points pad to whole bytes
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), F.linear(x, dequantize(q, scales, zeros, 128), bias), atol=1e-4)


def test_w4_g128_is_within_three_percent_of_4_25_bits():
    layer = QuantLinear.from_codes(*rtn(torch.randn(256, 1024), Grid(4), 128), 4, 128)
    assert layer.nbytes() * 8 / (256 * 1024) == pytest.approx(4.25, rel=0.03)


def test_quant_linear_keeps_fp16_scales_when_the_model_changes_dtype():
    layer = QuantLinear.from_codes(*rtn(torch.randn(8, 64), Grid(4), 32), 4, 32, bias=torch.zeros(8))
    before = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, before)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("settings, message", [
    ({"wbits": 5}, "5"),
    ({"method": "nosuch"}, "Unknown method"),
    ({"method": "smoothquant", "wbits": 4, "abits": 16}, "W4A16 is not one of them"),
    ({"abits": 8}, "weight-only"),
    ({"method": "awq", "act_order": True}, "Act-order"),
    ({"group_size": 100}, "multiple of 8"),
    ({"calib_samples": 0}, "calibration sample"),
])
def test_recipe_refuses_what_cannot_work(settings, message):
    with pytest.raises(QuantizationError, match=message):
        QuantRecipe(**settings).validate()


def test_recipe_round_trips_through_json():
    recipe = QuantRecipe(method="awq", wbits=3, skip=("head", "*.ff_out"))
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.skips("model.transformer.blocks.0.ff_out", "down")
    assert not recipe.skips("model.transformer.blocks.0.q_proj", "q")


def test_stored_bytes_are_counted_without_repacking_codes_a_kernel_holds(monkeypatch):
    from dllm_studio.quant import qlinear as qlinear_module

    linear = torch.nn.Linear(256, 64, bias=True)
    layer = QuantLinear.from_codes(*rtn(linear.weight.detach(), Grid(4), 128), 4, 128, bias=linear.bias)
    from dllm_studio.quant.kernels.int4 import Int4

    layer.release_codes(Int4(layer))  # as the kernel dispatch does on CPU: the kernel holds the only copy of the codes
    expected = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    repacked = []
    monkeypatch.setattr(qlinear_module, "pack", lambda *a: repacked.append(a))
    assert layer.codes_source is not None and layer.nbytes() == expected and not repacked
    assert set(layer.stored_tensors()) == set(layer.state_dict())
