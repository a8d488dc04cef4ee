"""dtype "auto": the fast floating-point dtype for the machine (`hardware.fast_dtype`), the checkpoint's own when
only that fits, and the reason shown by `info`, the generation stats and the Models page. Runs under a fake
AVX2-only and a fake AMX CPU, so the result does not depend on the CPU running the tests."""

import json
import re

import pytest
import torch
from conftest import AMX_CPU, AVX2_CPU

from dllm_studio import hardware, jobs
from dllm_studio.checkpoint import load_bytes
from dllm_studio.cli import main
from dllm_studio.errors import InsufficientMemoryError
from dllm_studio.events import LoadWarning
from dllm_studio.memory import ACTIVATION_SHARE, HEADROOM
from dllm_studio.models import load_model, open_model

AVX2_REASON = "float32: this CPU (AVX2) has no bf16 units, bf16 matmuls would be ~4x slower"
AMX_REASON = "bfloat16: this CPU has AMX, bf16 matmuls beat fp32"


@pytest.fixture
def cpu(monkeypatch):
    """cpu(units): pretend this machine's CPU has those units."""
    return lambda units: monkeypatch.setattr(hardware, "cpu_units", lambda: units)


@pytest.mark.parametrize("units,dtype,reason", [(AVX2_CPU, torch.float32, AVX2_REASON),
                                                (AMX_CPU, torch.bfloat16, AMX_REASON)])
def test_auto_is_the_fast_dtype_for_the_cpu_whatever_the_checkpoint_holds(cpu, llada_dir, units, dtype, reason):
    cpu(units)
    assert hardware.fast_dtype_reason() == reason
    for source in ("demo", llada_dir):  # stored as float32 and as bfloat16
        model = load_model(source)
        assert model.dtype == dtype and model.dtype_reason == reason
        assert all(p.dtype == dtype for p in model.module.parameters())


def test_an_explicit_dtype_is_taken_as_asked(cpu, llada_dir):
    cpu(AMX_CPU)
    model = load_model("demo", dtype="float32")
    assert model.dtype == torch.float32 and model.dtype_reason == "float32: asked for explicitly"
    cpu(AVX2_CPU)
    assert load_model(llada_dir, dtype="float16").dtype == torch.float16


def test_a_gpu_runs_bf16():
    assert hardware.fast_dtype("cuda") == torch.bfloat16
    assert hardware.fast_dtype_reason("cuda:0") == "bfloat16: CUDA devices run bf16 at full rate"


def free_for(folder, itemsize):
    """Free memory under which loading `folder` at `itemsize` bytes per weight just fits."""
    return int(load_bytes(folder, itemsize) * (1 + ACTIVATION_SHARE) / HEADROOM) + 1_000


def test_auto_falls_back_to_the_stored_dtype_when_only_that_fits(cpu, llada_dir, monkeypatch, capsys):
    """On an AVX2 CPU a bf16 checkpoint would be upcast to fp32 (twice the memory); where that does not fit but
    bf16 does, it loads as stored and says so, rather than refusing."""
    cpu(AVX2_CPU)
    free = free_for(llada_dir, 2)
    assert free * HEADROOM < load_bytes(llada_dir, 4) * (1 + ACTIVATION_SHARE)  # fp32 would not fit
    monkeypatch.setattr("dllm_studio.memory.available_bytes", lambda device="cpu": free)
    events = []
    model = load_model(llada_dir, on_event=events.append)
    assert model.dtype == torch.bfloat16
    assert model.dtype_reason.startswith("bfloat16 as stored: float32, the fast dtype here, would need about ")
    assert model.dtype_reason.endswith(" is free")
    warnings = [e.message for e in events if isinstance(e, LoadWarning)]
    assert warnings == [f"{llada_dir}: loaded at {model.dtype_reason}."]
    # info describes what a load would do, from the headers alone
    assert main(["info", str(llada_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dtype"], info["dtype_reason"]) == ("bfloat16", model.dtype_reason)
    # an explicit float32 is not second-guessed: it is refused with the fp32 estimate
    with pytest.raises(InsufficientMemoryError, match="Loading .* needs about"):
        load_model(llada_dir, dtype="float32")


def test_a_model_too_big_even_as_stored_is_refused_with_the_stored_dtypes_estimate(cpu, llada_dir, monkeypatch):
    cpu(AVX2_CPU)
    free = free_for(llada_dir, 2) - 2_000
    monkeypatch.setattr("dllm_studio.memory.available_bytes", lambda device="cpu": free)
    with pytest.raises(InsufficientMemoryError, match="Loading .* needs about .* of RAM is free") as refused:
        load_model(llada_dir)
    weights = load_bytes(llada_dir, 2)  # the least "auto" could take
    assert refused.value.needed == weights + int(weights * ACTIVATION_SHARE)
    described = jobs.run(open_model(llada_dir, device="meta"))  # a description is never refused
    assert described.info().dtype_reason == AVX2_REASON


def test_an_fp32_checkpoint_is_never_shrunk_to_fit(cpu, monkeypatch):
    """The fallback only ever takes the checkpoint's own dtype: the fp32 demo on an AVX2 CPU stays refused."""
    cpu(AVX2_CPU)
    monkeypatch.setattr("dllm_studio.memory.available_bytes", lambda device="cpu": 1_000_000)
    with pytest.raises(InsufficientMemoryError):
        load_model("demo")


def test_a_quantized_checkpoints_other_tensors_follow_auto(cpu, demo_rtn4, tmp_path):
    """Packed codes and fp16 scales keep their stored dtypes; embeddings, norms and the head take the fast one."""
    from dllm_studio.quant.export import save_quantized
    from dllm_studio.quant.qlinear import QuantLinear

    folder = save_quantized(demo_rtn4.model, tmp_path / "w4")  # stored as float32, the demo's dtype
    for units, dtype in ((AMX_CPU, torch.bfloat16), (AVX2_CPU, torch.float32)):
        cpu(units)
        model = load_model(folder)
        quantized = [m for m in model.module.modules() if isinstance(m, QuantLinear)]
        assert quantized and all(m.scales.dtype == torch.float16 and m.qweight.dtype == torch.uint8 for m in quantized)
        assert all(p.dtype == dtype for p in model.module.parameters())  # the packed tensors are buffers
        assert model.dtype_reason == (AMX_REASON if units is AMX_CPU else AVX2_REASON)


@pytest.mark.parametrize("units,dtype,reason", [(AVX2_CPU, "float32", AVX2_REASON),
                                                (AMX_CPU, "bfloat16", AMX_REASON)])
def test_info_says_which_dtype_and_why_and_the_cpu(cpu, capsys, units, dtype, reason):
    cpu(units)
    assert main(["info", "demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dtype"], info["dtype_reason"], info["cpu"]) == (dtype, reason, units.line())
    assert main(["info", "demo"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert (rows["weights dtype"], rows["cpu"]) == (reason, units.line())


def test_info_for_a_gpu_says_bf16_without_one(capsys):
    """`info --device cuda` describes the load there, even on a machine without a GPU (no memory asked of it)."""
    assert main(["info", "demo", "--device", "cuda", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dtype"], info["dtype_reason"]) == ("bfloat16", "bfloat16: CUDA devices run bf16 at full rate")


def test_generate_stats_say_the_dtype_and_why(cpu, capsys):
    cpu(AMX_CPU)
    assert main(["generate", "demo", "--prompt", "What is the capital of France?", "--gen-length", "8",
                 "--steps", "8", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert (stats["dtype"], stats["dtype_reason"]) == ("bfloat16", AMX_REASON)


@pytest.mark.gui
def test_the_models_page_says_which_dtype_and_why(qtbot, open_page, demo_model):
    from ui.pages.models import ModelsPage

    form = open_page(ModelsPage).facts
    cell = lambda row, role: form.itemAt(row, role).widget().text()  # noqa: E731
    rows = {cell(r, form.ItemRole.LabelRole): cell(r, form.ItemRole.FieldRole) for r in range(form.rowCount())}
    assert rows["Weights held as:"] == AVX2_REASON == demo_model.dtype_reason
