"""Library runtimes (bitsandbytes, optimum-quanto, torchao) as quantization methods, on the demo model."""

import json
import math
import sys

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.errors import ExportError, QuantizationError
from dllm_studio.events import BlockQuantized, LayerQuantized
from dllm_studio.quant.recipe import QuantRecipe
from test_cli import run_cli

# method, weight bits, activation bits, the library it needs, and the band its mean layer error must fall in
# on the demo (weight-only int8 rounds to ~0.3 %, 4-bit formats to ~5 %, int2 to ~25 %; int8 activations add
# their own rounding on top).
CASES = {
    "bnb-nf4": ("bnb-nf4", 4, 16, "bitsandbytes", (0.02, 0.09)),
    "bnb-fp4": ("bnb-fp4", 4, 16, "bitsandbytes", (0.02, 0.12)),
    "bnb-int8": ("bnb-int8", 8, 16, "bitsandbytes", (0.0005, 0.01)),
    "quanto-w8": ("quanto", 8, 16, "optimum.quanto", (0.0005, 0.01)),
    "quanto-w4": ("quanto", 4, 16, "optimum.quanto", (0.02, 0.1)),
    "quanto-w2": ("quanto", 2, 16, "optimum.quanto", (0.15, 0.5)),
    "quanto-w8a8": ("quanto", 8, 8, "optimum.quanto", (0.005, 0.05)),
    "torchao-w8": ("torchao", 8, 16, "torchao", (0.0005, 0.01)),
    "torchao-w8a8": ("torchao", 8, 8, "torchao", (0.002, 0.03)),
}
PROMPT = [{"role": "user", "content": "What is 2 plus 3?"}]
_results = {}


def quantized(demo_model, case):
    """The demo quantized with one case's recipe, and its events (made once per case)."""
    from dllm_studio.quant.pipeline import quantize

    if case not in _results:
        method, wbits, abits, package, _ = CASES[case]
        pytest.importorskip(package, reason=f"{package} is not installed (pip install -e \".[runtimes]\")")
        events = []
        recipe = QuantRecipe(method=method, wbits=wbits, abits=abits, calib_samples=4, seq_len=64)
        _results[case] = jobs.run(quantize(demo_model, recipe), events.append), events
    return _results[case]


@pytest.mark.parametrize("case", CASES)
def test_quantizes_with_plausible_errors_generates_and_reloads_identically(case, demo_model, tmp_path):
    from dllm_studio.models import load_model
    from dllm_studio.quant import runtimes
    from dllm_studio.quant.export import save_quantized
    from dllm_studio.sampling import GenerationConfig

    result, events = quantized(demo_model, case)
    low, high = CASES[case][4]
    layers = [e for e in events if isinstance(e, LayerQuantized)]
    blocks = [e for e in events if isinstance(e, BlockQuantized)]
    assert len(layers) == result.summary["quantized_layers"] == len(demo_model.linear_layers()) - 1  # head kept
    assert len(blocks) == demo_model.num_layers
    errors = [e.relative_error for e in layers]
    assert all(math.isfinite(e) and e > 0 for e in errors)
    assert low < sum(errors) / len(errors) < high
    held = [m for m in result.model.module.modules() if runtimes.method_of(m)]
    assert len(held) == len(layers) and all(runtimes.method_of(m) == CASES[case][0] for m in held)

    answer = jobs.run(result.model.denoise(result.model.chat_ids(PROMPT), GenerationConfig(gen_length=16, steps=16,
                                                                                            block_length=16)))
    assert len(answer.token_ids) == 16

    s = result.summary
    wbits = CASES[case][1]
    # Packed weights plus the library's scales: a little over the weight bits, far under the fp32 they came from.
    assert wbits < s["bits_per_weight"] < wbits + 1
    assert s["model_bytes_after"] < s["model_bytes_before"] and s["model_bytes_after"] == result.model.weight_bytes()

    folder = save_quantized(result.model, tmp_path / "q", profile={"summary": s})
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == runtimes.BY_METHOD[CASES[case][0]].quant_method
    reloaded = load_model(folder)
    assert reloaded.quantization == result.recipe
    assert reloaded.weight_bytes() == result.model.weight_bytes()
    ids = torch.tensor([demo_model.chat_ids(PROMPT) + [demo_model.mask_token_id] * 16])
    assert torch.equal(reloaded.forward(ids), result.model.forward(ids))


def test_bitsandbytes_writes_the_layout_transformers_writes(demo_model, tmp_path):
    from safetensors import safe_open

    from dllm_studio.models import load_model
    from dllm_studio.quant.export import save_quantized

    result, _ = quantized(demo_model, "bnb-nf4")
    folder = save_quantized(result.model, tmp_path / "nf4")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                   "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")} == {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    card = (folder / "README.md").read_text()
    assert "BNB-NF4 W4A16 b64" in card and "group size" not in card and "bitsandbytes format" in card
    assert load_model(folder).info().quantization == "bnb-nf4 4-bit b64"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = next(n.removesuffix(".weight.absmax") for n in keys if n.endswith(".weight.absmax"))
    assert {f"{layer}.weight.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                            "quant_state.bitsandbytes__nf4")} <= keys


def test_nf4_rounds_far_closer_than_int2_and_int8_closer_still(demo_model):
    def mean_error(case):
        errors = [e.relative_error for e in quantized(demo_model, case)[1] if isinstance(e, LayerQuantized)]
        return sum(errors) / len(errors)

    assert mean_error("bnb-int8") < mean_error("bnb-nf4") / 5
    assert mean_error("bnb-nf4") < mean_error("quanto-w2") / 3


def test_a_library_model_is_refused_in_the_gptq_format_before_a_file_is_written(demo_model, tmp_path):
    from dllm_studio.quant.export import save_quantized

    result, _ = quantized(demo_model, "torchao-w8")
    with pytest.raises(ExportError, match="--format native"):
        save_quantized(result.model, tmp_path / "q", fmt="gptq")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_the_gptq_format_for_a_library_method_before_loading(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    from dllm_studio import cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "quantize", "demo", "--method", "torchao", "--wbits", 8, "--format", "gptq",
                           "--out", tmp_path / "q")
    assert code != 0 and "cannot describe" in err and "--format native" in err
    assert not (tmp_path / "q").exists()


HINT = 'bitsandbytes is not installed: pip install -e ".[runtimes]"'


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """bitsandbytes made unimportable, as on a machine without the runtimes extra."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_a_missing_library_is_refused_with_the_reason_by_the_recipe(no_bitsandbytes):
    with pytest.raises(QuantizationError, match=r"bnb-nf4 cannot run: bitsandbytes is not installed: "
                                                r'pip install -e "\.\[runtimes\]"'):
        QuantRecipe(method="bnb-nf4", wbits=4).validate()
    QuantRecipe(method="rtn", wbits=4).validate()  # our own methods never need it


def test_a_missing_library_is_refused_by_the_cli_before_loading(no_bitsandbytes, capsys, tmp_path, monkeypatch):
    from dllm_studio import cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "quantize", "demo", "--method", "bnb-int8", "--wbits", 8, "--out", tmp_path / "q")
    assert code != 0 and HINT in err
    assert not (tmp_path / "q").exists()


def test_the_method_list_imports_no_library():
    import subprocess

    code = ("import sys; from dllm_studio.quant.recipe import METHODS; import dllm_studio.cli; "
            "print(sorted(m for m in ('bitsandbytes', 'optimum.quanto', 'torchao', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("settings, message", [
    ({"method": "torchao", "wbits": 8, "abits": 4}, "16 or 8 bits, not 4"),
    ({"method": "bnb-nf4", "wbits": 4, "abits": 8}, "16 bits, not 8"),
    ({"method": "quanto", "wbits": 3}, "8, 4, 2 bits, not 3"),
    ({"method": "quanto", "wbits": 8, "abits": 8, "skip": ()}, "keep the head"),
    ({"method": "bnb-nf4", "wbits": 4, "symmetric": True}, "--sym does not apply"),
    ({"method": "bnb-nf4", "wbits": 4, "group_size": 32}, "blocks|b64"),
])
def test_library_recipes_refuse_what_the_library_cannot_do(settings, message):
    pytest.importorskip({"t": "torchao", "b": "bitsandbytes", "q": "optimum.quanto"}[settings["method"][0]])
    with pytest.raises(QuantizationError, match=message):
        QuantRecipe(**settings).validate()


def test_library_recipes_are_labelled_with_the_library_layout():
    assert QuantRecipe(method="quanto", wbits=8, abits=8).label == "QUANTO W8A8 per-channel"
    assert QuantRecipe(method="quanto", wbits=4).label == "QUANTO W4A16 g128"
    assert QuantRecipe(method="bnb-fp4", wbits=4).label == "BNB-FP4 W4A16 b64"


def test_the_memory_preflight_counts_library_storage(demo_model):
    from dllm_studio.quant.pipeline import theory_bits, working_set

    nf4 = QuantRecipe(method="bnb-nf4", wbits=4)
    assert theory_bits(nf4, 128) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert theory_bits(QuantRecipe(method="quanto", wbits=4), 128, 32) == pytest.approx(4.5)  # fp32 scale + shift
    int8 = working_set(demo_model, QuantRecipe(method="torchao", wbits=8))["quantized copy"]
    assert working_set(demo_model, nf4)["quantized copy"] < int8 * 0.6


def test_cancel_between_layers_keeps_nothing(demo_model):
    pytest.importorskip("bitsandbytes")
    from dllm_studio.errors import Cancelled
    from dllm_studio.events import CancelToken
    from dllm_studio.quant.pipeline import quantize

    cancel = CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, LayerQuantized):
            cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(quantize(demo_model, QuantRecipe(method="bnb-nf4", wbits=4, calib_samples=2, seq_len=32), cancel),
                 on_event)
    assert sum(isinstance(e, LayerQuantized) for e in seen) == 1
    assert not any(hasattr(m, "quant_runtime") for m in demo_model.module.modules())
