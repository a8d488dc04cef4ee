"""Kernels: each agrees with the reference dequantization of the same stored codes, and the choice between
them is measured, verified, cached per machine and visible."""

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from dllm_studio.quant import kernels
from dllm_studio.quant.grid import Grid, rtn
from dllm_studio.quant.kernels import KERNELS
from dllm_studio.quant.kernels.base import dynamic_int8
from dllm_studio.quant.qlinear import QuantLinear

CPU = torch.device("cpu")


def make_layer(bits, group, *, act_order=False, symmetric=False, out=64, inp=256, act_bits=16, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    w[:, 3] *= 8  # an outlier column, as real layers have
    q, scales, zeros = rtn(w, Grid(bits, symmetric), group)
    g_idx = None
    if act_order:  # GPTQ's act-order: groups follow a permuted column order
        perm = torch.randperm(inp, generator=gen)
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[perm] = (torch.arange(inp) // group).int()
    b = torch.randn(out, generator=gen) if bias else None
    return QuantLinear.from_codes(q, scales, zeros, bits, group, g_idx=g_idx, bias=b, act_bits=act_bits)


def reference(layer, x):
    """The float64 product of x with the stored codes' dequantized weight (W8A8: with x rounded per token)."""
    if layer.act_bits == 8:
        q, scale = dynamic_int8(x)
        x = q.double() * scale.double()
    return x.double() @ layer.dequantize(torch.float64).T


GRIDS = [(bits, group, act_order, sym) for bits, group, act_order, sym in
         itertools.product((2, 3, 4, 8), (None, 32, 128), (False, True), (False, True)) if group or not act_order]


@pytest.mark.parametrize("name", [n for n in KERNELS if n != "w8a8"])
@pytest.mark.parametrize("bits,group,act_order,sym", GRIDS)
def test_every_kernel_agrees_with_the_reference_dequantization(name, bits, group, act_order, sym):
    layer = make_layer(bits, group, act_order=act_order, symmetric=sym)
    why = KERNELS[name].unsupported(layer, CPU)
    expected_runs = {"dequant": True, "int4": bits <= 4, "int8": bits == 8 and group is None and sym}[name]
    assert (why is None) == expected_runs, why
    if why:
        return
    kernel = KERNELS[name](layer)
    for tokens in (1, 5, 40):
        x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
        y, ref = kernel(x), reference(layer, x)
        assert y.shape == (tokens, layer.out_features) and y.dtype == x.dtype
        err = float((y.double() - ref).norm() / ref.norm())
        # dequant computes in the input's fp32; the torch kernels round activations to bf16 (~3e-3)
        assert err <= (1e-6 if name == "dequant" else 1e-2), err


@pytest.mark.parametrize("sym", [False, True])
def test_w8a8_runs_int8_products_for_layers_with_8bit_activations(sym):
    layer = make_layer(8, None, symmetric=sym, act_bits=8)
    assert KERNELS["w8a8"].unsupported(layer, CPU) is None
    assert KERNELS["int8"].unsupported(layer, CPU) is not None  # weight-only would skip the activation rounding
    assert KERNELS["w8a8"].unsupported(make_layer(8, None), CPU) is not None
    for tokens in (3, 40):  # below and above _int_mm's 16-row minimum
        x = torch.randn(tokens, layer.in_features)
        ref = reference(layer, x)
        for name in ("w8a8", "dequant"):
            y = KERNELS[name](layer)(x)
            assert float((y.double() - ref).norm() / ref.norm()) <= 1e-5, name
        # and the activation rounding is real: far from the float product
        float_ref = x.double() @ layer.dequantize(torch.float64).T
        assert float((ref - float_ref).norm() / float_ref.norm()) > 1e-4


def test_dequant_kernel_matches_the_old_whole_weight_forward_and_irregular_groups():
    layer = make_layer(3, 64, inp=200, bias=True)  # 200 = 3 groups of 64 and one of 8
    x = torch.randn(2, 7, 200)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantize(), layer.bias), atol=1e-5, rtol=1e-5)


def test_kernels_only_read_the_stored_form(monkeypatch):
    layer = make_layer(4, 128)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for name in ("dequant", "int4"):
        monkeypatch.setenv("DLLM_STUDIO_KERNEL", name)
        layer.forget_kernels()
        layer(torch.randn(40, 256))
        assert set(layer.built_kernels) == {name}
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """The chooser as users get it: nothing forced, an empty per-machine cache, fake timings."""
    monkeypatch.delenv("DLLM_STUDIO_KERNEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._decided.clear()
    speed = {"dequant": 3.0, "int4": 1.0, "int8": 2.0, "w8a8": 1.0}
    monkeypatch.setattr(kernels, "_timed", lambda kernel, x, device: speed[kernel.name] * (1 + (x.shape[0] > 64)))
    yield speed
    kernels._decided.clear()


def test_the_fastest_agreeing_kernel_is_chosen_per_bucket_and_cached(measured, monkeypatch):
    layer = make_layer(4, 128)
    layer(torch.randn(8, 256))
    assert layer.kernel_choice == {32: "int4"}
    measured["int4"] = 5.0  # at 256 tokens dequant wins now
    layer(torch.randn(300, 256))
    assert layer.kernel_choice == {32: "int4", 256: "dequant"}
    assert kernels.choices(layer) == {32: {"int4": 1}, 256: {"dequant": 1}}
    assert kernels.describe(kernels.choices(layer)) == "int4 x1 at 32 tokens; dequant x1 at 256 tokens"
    table = json.loads(kernels.cache_path().read_text())
    assert list(table) == [kernels.machine()]
    assert table[kernels.machine()] == {"256->64 w4a16 g128 cpu float32 t32": "int4",
                                        "256->64 w4a16 g128 cpu float32 t256": "dequant"}
    # another layer of the same shape, in a fresh process (nothing decided yet): read back, not measured
    kernels._decided.clear()
    other = make_layer(4, 128, seed=1)
    monkeypatch.setattr(kernels, "measure", lambda *a: pytest.fail("measured again despite the cache"))
    other(torch.randn(8, 256))
    assert other.kernel_choice == {32: "int4"}


def test_a_kernel_that_disagrees_with_the_reference_is_never_chosen(measured, monkeypatch):
    layer = make_layer(4, 128)
    broken = KERNELS["int4"].__call__
    monkeypatch.setattr(KERNELS["int4"], "__call__", lambda self, x: broken(self, x) * 1.1)
    result = kernels.measure(layer, CPU, torch.float32, 32, ["dequant", "int4"])
    assert result["chosen"] == "dequant"
    assert "int4" in result["rejected"] and "relative error" in result["rejected"]["int4"]


def test_a_forced_kernel_runs_where_it_can_and_a_bad_name_is_refused(monkeypatch):
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "int4")
    w4, w8 = make_layer(4, 128), make_layer(8, 128)
    w4(torch.randn(4, 256)), w8(torch.randn(4, 256))
    assert w4.kernel_choice == {32: "int4"} and w8.kernel_choice == {32: "dequant"}  # int4 cannot run W8
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "fast")
    w4.forget_kernels()
    with pytest.raises(ValueError, match="DLLM_STUDIO_KERNEL='fast' names no kernel"):
        w4(torch.randn(4, 256))


def test_moving_or_copying_a_layer_drops_the_kernels_built_from_its_old_tensors(monkeypatch):
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "int4")
    layer = make_layer(4, 128)
    layer(torch.randn(4, 256))
    twin = copy.deepcopy(layer)
    assert twin.built_kernels == {} and twin.kernel_choice == {}
    assert torch.allclose(twin(torch.ones(1, 256)), layer(torch.ones(1, 256)))
    layer.to(torch.float64)
    assert layer.built_kernels == {}


def test_bucket_boundaries():
    assert [kernels.bucket(t) for t in (1, 32, 90, 91, 256, 4096)] == [32, 32, 32, 256, 256, 256]


def test_a_layer_whose_grid_the_fast_kernel_cannot_reproduce_runs_the_reference(monkeypatch):
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "int4")
    tame = make_layer(4, None)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:, :8] += 1.0  # eight large positive columns: each row's zero point sits at 1, far from 8
    q, scales, zeros = rtn(w, Grid(4, False), None)
    stretched = QuantLinear.from_codes(q, scales, zeros, 4, None)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))  # the probe `_agrees` uses
    err = float((KERNELS["int4"](stretched)(x).double() - reference(stretched, x)).norm() / reference(stretched, x).norm())
    assert err > kernels.AGREEMENT  # the case is real: tinygemm's bf16 offsets lose it
    tame(x), stretched(x)
    assert tame.kernel_choice == {32: "int4"} and stretched.kernel_choice == {32: "dequant"}
    assert set(stretched.built_kernels) == {"dequant"}


def relative(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits,group,act_order", [(4, 128, False), (3, 32, True), (2, None, False), (4, 64, True)])
def test_once_int4_runs_the_layer_keeps_one_copy_of_its_codes(monkeypatch, bits, group, act_order):
    layer = make_layer(bits, group, act_order=act_order, bias=True)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    codes = layer.codes()
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    ref = reference(layer, x) + layer.bias.double()
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "int4")
    layer(x[:8])
    assert layer.qweight.numel() == 0 and layer.codes_source is layer.built_kernels["int4"]
    assert layer.kernel_codes.numel() == 64 * 256 // 2  # the kernel's 4 bits a code, counted as held memory
    after = layer.state_dict()  # the stored form comes back exactly, for export
    assert after.keys() == stored.keys() and all(torch.equal(stored[k], after[k]) for k in stored)
    assert torch.equal(layer.codes(), codes)
    # a bucket that runs the dequantize kernel reads the int4 layout, still exactly the reference
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "dequant")
    assert relative(layer(x), ref) <= 1e-6
    assert layer.kernel_choice == {32: "int4", 256: "dequant"} and layer.qweight.numel() == 0
    twin = copy.deepcopy(layer)  # copies and moves get the stored form back
    assert torch.equal(twin.qweight, stored["qweight"]) and twin.codes_source is None
    assert relative(twin(x), ref) <= 1e-6
    layer.to(torch.float64)
    assert torch.equal(layer.qweight, stored["qweight"]) and "kernel_codes" not in dict(layer.named_buffers())


def test_an_export_is_the_same_bytes_whichever_kernel_ran(demo_rtn4, tmp_path, monkeypatch):
    import hashlib

    from dllm_studio.quant.export import save_quantized

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
                if p.suffix in (".safetensors", ".json") and p.name != "profile.json"}

    model = copy.copy(demo_rtn4.model)
    model.module = copy.deepcopy(demo_rtn4.model.module)
    before = {fmt: digest(save_quantized(model, tmp_path / f"before-{fmt}", fmt=fmt)) for fmt in ("native", "gptq")}
    monkeypatch.setenv("DLLM_STUDIO_KERNEL", "int4")
    model.module(torch.randint(0, 100, (1, 20)), None)
    released = [m for m in model.module.modules() if isinstance(m, QuantLinear) and m.codes_source is not None]
    assert released  # int4 runs the demo's 128-wide layers and holds their codes
    after = {fmt: digest(save_quantized(model, tmp_path / f"after-{fmt}", fmt=fmt)) for fmt in ("native", "gptq")}
    assert after == before


def test_int4_packs_a_few_row_blocks_at_a_time_into_the_layout_torch_packs_whole(monkeypatch):
    from dllm_studio.quant.kernels import int4

    layer = make_layer(3, 32, act_order=True, out=160)
    whole = int4.Int4(layer).packed
    monkeypatch.setattr(int4, "CHUNK", 32 * 256)  # one block of 32 rows a step: five steps
    assert torch.equal(int4.Int4(layer).packed, whole)
    reference_packing = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        int4.Int4(layer)._kernel_codes(layer, 0, 160).contiguous(), 1)
    assert torch.equal(whole, reference_packing)


def test_a_quantized_folder_chooses_its_kernels_while_it_loads(measured, demo_rtn4, tmp_path, monkeypatch):
    from dllm_studio import jobs
    from dllm_studio.events import LoadProgress
    from dllm_studio.models import KERNELS_STAGE, open_model
    from dllm_studio.quant.export import save_quantized

    folder = save_quantized(demo_rtn4.model, tmp_path / "w4")
    stages = []
    model = jobs.run(open_model(folder), lambda e: stages.append(e.stage) if isinstance(e, LoadProgress) else None)
    assert KERNELS_STAGE in stages
    table = json.loads(kernels.cache_path().read_text())[kernels.machine()]
    layers = [m for m in model.module.modules() if isinstance(m, QuantLinear)]
    choosable = {kernels.shape(m) for m in layers if sum(w is None for w in kernels.runnable(m, CPU).values()) > 1}
    assert choosable and len(choosable) < len({kernels.shape(m) for m in layers})  # one shape only runs dequant
    assert set(table) == {f"{s} cpu float32 t{b}" for s in choosable for b in kernels.BUCKETS}
    assert all(not m.kernel_choice for m in model.module.modules() if isinstance(m, QuantLinear))
    monkeypatch.setattr(kernels, "measure", lambda *a: pytest.fail("measured in the first step, not at load"))
    model.module(torch.randint(0, 100, (1, 20)), None)
    assert kernels.choices(model.module)[32]
    assert jobs.run(open_model("demo"), lambda e: stages.append(e.stage)) and stages.count(KERNELS_STAGE) == 1


def test_a_model_quantized_here_has_its_kernels_chosen_when_the_job_ends(measured, demo_model):
    from dllm_studio import jobs
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    jobs.run(quantize(demo_model, QuantRecipe(method="rtn", wbits=4, calib_samples=2, seq_len=32)))
    # the calibration forwards (2 x 32 rows) choose for 32 tokens; 256-token steps are chosen at the end too
    chosen = json.loads(kernels.cache_path().read_text())[kernels.machine()]
    assert {key.rsplit(" ", 1)[1] for key in chosen} == {"t32", "t256"}
