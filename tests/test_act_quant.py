"""Weight-and-activation quantization in QuantLinear: the per-token activation grid with its clip ratio, the
kernels that run it (simulated, or int8 x int8), online input transforms, and native checkpoints that keep them."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from dllm_studio.cli import main
from dllm_studio.errors import ModelLoadError, QuantizationError
from dllm_studio.models import load_model
from dllm_studio.quant import kernels
from dllm_studio.quant.export import check_format, save_quantized
from dllm_studio.quant.grid import Grid, rtn
from dllm_studio.quant.kernels import KERNELS, SIMULATED_NOTE
from dllm_studio.quant.kernels.base import dynamic_int8, fake_quantize_activations, quantize_activations
from dllm_studio.quant.pipeline import quantization_config
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.storage import check_qconfig
from dllm_studio.quant.transforms import InputTransform
from dllm_studio.speed import speed_note

BLOCK0 = "model.transformer.blocks.0."


def weight(out=64, inp=128, seed=0):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[:, 3] *= 8  # an outlier column, as real layers have
    return w


def make_layer(bits, group, *, act_bits=16, act_clip=1.0, symmetric=False, transform=None):
    w = weight()
    if transform is not None:
        w = transform.weight(w)
    q, scales, zeros = rtn(w, Grid(bits, symmetric), group)
    return QuantLinear.from_codes(q, scales, zeros, bits, group, act_bits=act_bits, act_clip=act_clip,
                                  transform=transform)


def outlier_input(tokens=40, inp=128, seed=1):
    x = torch.randn(tokens, inp, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 20  # an outlier channel: what the clip ratio trades against
    return x


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def orthogonal_blocks(blocks, size, seed):
    a = torch.randn(blocks, size, size, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(a).Q


def full_transform(inp, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return InputTransform(inp, smooth=torch.rand(inp, generator=gen) + 0.5, rotation1=orthogonal_blocks(inp // 16, 16, seed),
                          perm=torch.randperm(inp, generator=gen), rotation2=orthogonal_blocks(inp // 32, 32, seed + 1))


def test_the_activation_grid_per_token_with_a_clip_ratio():
    x = torch.tensor([[127.0, -50.4, 3.6, -0.2], [7.0, -3.4, 2.6, 0.2]])
    q, scale = quantize_activations(x, 8)
    assert q.dtype == torch.int8 and q.tolist() == [[127, -50, 4, 0], [127, -62, 47, 4]]
    assert torch.equal(scale, torch.tensor([[1.0], [7 / 127]]))
    q, scale = quantize_activations(x[:1], 8, clip=0.5)  # scale 0.5: 254 and -100.8 saturate at the top level
    assert q.tolist() == [[127, -101, 7, 0]] and scale.item() == 0.5
    q, scale = quantize_activations(x[1:], 4)  # 7 levels each side, scale 1
    assert q.tolist() == [[7, -3, 3, 0]] and scale.item() == 1.0
    assert fake_quantize_activations(x[1:], 4, clip=0.5).tolist() == [[3.5, -3.5, 2.5, 0.0]]
    assert torch.equal(dynamic_int8(x, 0.5)[0], quantize_activations(x, 8, 0.5)[0])  # the W8A8 name still works


def test_dequant_kernel_simulates_4bit_activations_exactly():
    layer = make_layer(4, 32, act_bits=4, act_clip=0.9)
    x = outlier_input()
    scale = 0.9 * x.double().abs().amax(-1, keepdim=True) / 7
    xq = (x.double() / scale).round().clamp(-7, 7) * scale
    reference = xq @ layer.dequantize(torch.float64).T
    y = KERNELS["dequant"](layer)(x)
    assert rel(y, reference) < 1e-6
    unrounded = x.double() @ layer.dequantize(torch.float64).T
    assert rel(reference, unrounded) > 1e-2  # the rounding is real, so the check above sees it


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (4, True)])
def test_the_int8_kernel_runs_wxa8_with_the_clip_as_the_simulation_does(bits, symmetric):
    layer = make_layer(bits, None, act_bits=8, act_clip=0.9, symmetric=symmetric)
    assert KERNELS["w8a8"].unsupported(layer, torch.device("cpu")) is None
    assert KERNELS["int8"].unsupported(layer, torch.device("cpu")) is not None
    for tokens in (3, 40):  # below and above _int_mm's 16-row minimum
        x = outlier_input(tokens)
        simulation = KERNELS["dequant"](layer)(x)
        assert rel(KERNELS["w8a8"](layer)(x), simulation) < 1e-5
        unclipped = KERNELS["dequant"](make_layer(bits, None, act_bits=8, symmetric=symmetric))(x)
        assert rel(unclipped, simulation) > 1e-4  # clip 0.9 is a different result the kernel reproduces
    assert KERNELS["w8a8"].unsupported(make_layer(4, 32, act_bits=8), torch.device("cpu")) is not None


def test_only_integer_activation_runs_count_as_real_and_reports_say_so(monkeypatch):
    a4, a8, a16 = make_layer(4, 32, act_bits=4, act_clip=0.9), make_layer(8, None, act_bits=8), make_layer(4, 32)
    assert kernels.simulated(a4) and kernels.simulated(a8) and not kernels.simulated(a16)  # pinned to dequant
    assert not kernels.simulated(a8, "w8a8") and kernels.simulated(a8, "dequant")
    assert kernels.shape(a4) == "128->64 w4a4 g32 clip0.9" and kernels.shape(a8) == "128->64 w8a8 per-channel"
    a4(torch.randn(8, 128))
    assert kernels.describe(kernels.choices(a4)) == f"dequant ({SIMULATED_NOTE}) x1 at 32 tokens"
    note = speed_note("W4A4", 10.0, 30.0, 4000, 1000, kernels.used(a4, 8))
    assert SIMULATED_NOTE in note and "slower" not in note
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "w8a8")
    a8(torch.randn(20, 128))
    assert kernels.choices(a8) == {32: {"w8a8": 1}}
    assert kernels.plan(a8, torch.device("cpu"), torch.float32)[0]["simulated"] is False
    assert kernels.plan(a4, torch.device("cpu"), torch.float32)[0]["simulated"] is True


def test_a_transformed_layer_computes_the_original_product():
    transform = full_transform(128)
    layer = make_layer(8, 32, transform=transform)
    x, w = outlier_input(6), weight()
    # The change of basis is exact: T(x) T'(W)^T = x W^T.
    assert rel(transform(x) @ transform.weight(w).T, x @ w.T) < 1e-5
    y = layer(x)
    assert rel(y, transform(x).double() @ layer.dequantize(torch.float64).T) < 1e-6
    assert rel(y, x @ w.T) < 1e-2 and rel(x @ layer.dequantize().T, x @ w.T) > 0.5  # the transform did run
    copied = copy.deepcopy(layer)
    assert copied.transform.parts() == ["smooth", "rotation1", "perm", "rotation2"] and torch.equal(copied(x), y)
    assert "transform=['smooth', 'rotation1', 'perm', 'rotation2']" in layer.extra_repr()
    assert sorted(k for k in layer.state_dict() if k.startswith("transform.")) == [
        "transform.perm", "transform.rotation1", "transform.rotation2", "transform.smooth"]


@pytest.fixture(scope="module")
def w4a4_model(llada_dir):
    """The tiny LLaDA with block 0's linears as W4A4 (clip 0.9) layers behind full input transforms, assembled as
    a method would (no calibration run: these tests are about storing such layers)."""
    model = load_model(llada_dir, dtype="float32")
    recipe = QuantRecipe(method="rtn", wbits=4, group_size=32, skip=("head", "*.blocks.1.*"))
    linears = [(n, m) for n, m in model.module.named_modules() if n.startswith(BLOCK0) and isinstance(m, torch.nn.Linear)]
    assert linears
    for i, (name, linear) in enumerate(linears):
        transform = full_transform(linear.in_features, seed=i)
        q, scales, zeros = rtn(transform.weight(linear.weight.detach()), Grid(4), 32)
        layer = QuantLinear.from_codes(q, scales, zeros, 4, 32, act_bits=4, act_clip=0.9, transform=transform,
                                       bias=linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.module.get_submodule(parent), child, layer)
    model.quantization = recipe
    model.config = {**model.config, "quantization_config": quantization_config(recipe, model.module)}
    return model


def test_a_w4a4_model_with_transforms_reloads_exactly_from_the_native_format(w4a4_model, tmp_path, capsys):
    out = save_quantized(w4a4_model, tmp_path / "native")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["act_bits"] == 4 and qconfig["act_clip"] == 0.9
    ids = torch.tensor([w4a4_model.chat_ids([{"role": "user", "content": "Hi"}])])
    reloaded = load_model(out, dtype="float32")
    assert torch.equal(reloaded.forward(ids), w4a4_model.forward(ids))
    ours = {n: m for n, m in w4a4_model.module.named_modules() if isinstance(m, QuantLinear)}
    at_bf16 = dict(load_model(out, dtype="bfloat16").module.named_modules())
    for name, layer in ours.items():
        again = at_bf16[name]
        assert (again.act_bits, again.act_clip) == (4, 0.9) and again.transform.parts() == layer.transform.parts()
        for part in layer.transform.parts():
            stored, loaded = getattr(layer.transform, part), getattr(again.transform, part)
            assert loaded.dtype == (torch.int32 if part == "perm" else torch.float32) and torch.equal(loaded, stored)
    # `info` reads it on meta and says its A4 rounding is simulated.
    assert main(["info", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kernels ")]
    assert rows and all("w4a4 g32 clip0.9" in row and row.endswith(f"; {SIMULATED_NOTE}") for row in rows)


def test_the_gptq_format_refuses_activation_quantization_and_rotations(w4a4_model, tmp_path):
    with pytest.raises(QuantizationError, match="The GPTQ format stores weight-only layers"):
        save_quantized(w4a4_model, tmp_path / "gptq", fmt="gptq")
    assert not (tmp_path / "gptq").exists()
    with pytest.raises(QuantizationError, match="export in the native format"):
        check_format(SimpleNamespace(method="rtn", abits=8), "gptq")
    check_format(SimpleNamespace(method="rtn", abits=8), "native")


def test_a_weight_only_config_is_unchanged_and_bad_activation_fields_are_refused():
    layer = make_layer(4, 32)
    config = quantization_config(QuantRecipe(method="rtn", wbits=4, group_size=32), torch.nn.Sequential(layer))
    assert "act_bits" not in config and "act_clip" not in config
    base = {"quant_method": "dllm_studio", "bits": 4, "group_size": 32}
    check_qconfig({**base, "act_bits": 8, "act_clip": 0.85})
    with pytest.raises(ModelLoadError, match=r"act_bits is 5; activations are quantized to 16, 8, 4 bits"):
        check_qconfig({**base, "act_bits": 5})
    for clip in (0, 1.5, "0.9"):
        with pytest.raises(ModelLoadError, match="act_clip is .* must be above 0 and at most 1"):
            check_qconfig({**base, "act_bits": 4, "act_clip": clip})
