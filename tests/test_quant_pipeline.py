"""The quantization job on real (tiny) checkpoints: events, cancel, export in both formats, reload, CLI."""

import errno
import json
import re

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.errors import Cancelled, ExportError, InsufficientMemoryError
from dllm_studio.events import BlockQuantized, CancelToken, LayerQuantized, LayerStats, MemorySample
from dllm_studio.memory import preflight
from dllm_studio.models import load_model
from dllm_studio.quant.export import VERIFY_MASKS, export, save_quantized, verify
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe

FAST = dict(group_size=32, calib_samples=8, seq_len=64)


def _prompt(model):
    return torch.tensor([model.chat_ids([{"role": "user", "content": "What is the capital of France?"}])])


def _state(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


@pytest.fixture(scope="module")
def gptq_w4(llada):
    events = []
    result = jobs.run(quantize(llada, QuantRecipe(method="gptq", wbits=4, **FAST)), events.append)
    return result, events


def test_events_describe_every_layer_and_block(llada, gptq_w4):
    result, events = gptq_w4
    linears = [l for l in llada.linear_layers() if l.role != "head"]
    stats = [e for e in events if isinstance(e, LayerStats)]
    done = [e for e in events if isinstance(e, LayerQuantized)]
    blocks = [e for e in events if isinstance(e, BlockQuantized)]
    assert sorted(e.name for e in stats) == sorted(l.name for l in linears) == sorted(e.name for e in done)
    assert [(b.block, b.blocks) for b in blocks] == [(1, 2), (2, 2)]
    assert blocks[-1].eta_s == 0 and all(b.rss_bytes > 0 for b in blocks)
    assert any(isinstance(e, MemorySample) for e in events)
    s = stats[0]
    assert len(s.channel_absmax) == 64
    channels = torch.tensor(s.channel_absmax)
    assert s.outlier_ratio == pytest.approx(float(channels.max() / channels.median()), rel=1e-3)
    assert s.top_channels[0] == (int(channels.argmax()), pytest.approx(float(channels.max()), abs=1e-3))
    # Masked calibration: both kinds of token were seen, and the split is reported.
    assert s.masked_outlier_ratio is not None and s.unmasked_outlier_ratio is not None
    assert all(0 < e.relative_error < 0.5 for e in done)
    json.dumps([e.to_dict() for e in events])  # every event crosses the engine/UI seam as plain data


def test_quantized_model_holds_packed_layers_and_leaves_the_original_alone(llada, gptq_w4):
    result, _ = gptq_w4
    q = result.model
    assert all(isinstance(q.module.get_submodule(l.name), QuantLinear) for l in llada.linear_layers() if l.role != "head")
    assert isinstance(q.module.get_submodule("model.transformer.ff_out"), torch.nn.Linear)  # head skipped
    assert all(isinstance(llada.module.get_submodule(l.name), torch.nn.Linear) for l in llada.linear_layers())
    assert q.weight_bytes() < llada.weight_bytes()
    assert result.summary["bits_per_weight"] == pytest.approx(result.summary["theory_bits_per_weight"], rel=0.03)
    ids = _prompt(llada)
    ref = llada.forward(ids)
    assert float((q.forward(ids) - ref).norm() / ref.norm()) < 0.5


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_every_method_runs_on_llada_and_dream(llada, dream, method):
    for model in (llada, dream):
        before = _state(model)
        result = jobs.run(quantize(model, QuantRecipe(method=method, wbits=8, **FAST)))
        ids = _prompt(model)
        ref = model.forward(ids)
        assert float((result.model.forward(ids) - ref).norm() / ref.norm()) < 0.05  # W8 is near-lossless
        after = model.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # AWQ folded scales into copies only


def test_cancel_between_layers_leaves_the_model_untouched(llada, tmp_path):
    before = _state(llada)
    cancel = CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, LayerQuantized):
            cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(quantize(llada, QuantRecipe(method="gptq", **FAST), cancel), on_event)
    assert sum(isinstance(e, LayerQuantized) for e in seen) == 1
    assert all(torch.equal(before[k], v) for k, v in llada.module.state_dict().items())
    assert all(isinstance(llada.module.get_submodule(l.name), torch.nn.Linear) for l in llada.linear_layers())


@pytest.mark.parametrize("fmt", ["native", "gptq"])
def test_export_reloads_with_identical_outputs(llada, gptq_w4, tmp_path, fmt):
    result, _ = gptq_w4
    out = save_quantized(result.model, tmp_path / "q", fmt=fmt, profile={"summary": result.summary})
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("gptq" if fmt == "gptq" else "dllm_studio")
    for name in ("model.safetensors", "tokenizer.json", "recipe.json", "profile.json", "README.md"):
        assert (out / name).exists(), name
    assert not list(tmp_path.glob(".q.*"))  # no temporary folder left behind
    reloaded = load_model(out, dtype="float32")
    ids = _prompt(llada)
    assert torch.equal(reloaded.forward(ids), result.model.forward(ids))
    report = verify(result.model, out)  # the same check, as the Export page runs it
    assert report["max_abs_logit_diff"] == 0.0 and report["argmax_agrees"] and report["positions"] > VERIFY_MASKS


def test_export_refuses_an_existing_folder_and_survives_a_full_disk(llada, gptq_w4, tmp_path, monkeypatch):
    result, _ = gptq_w4
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        save_quantized(result.model, out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dllm_studio.shards._raw_bytes", full_disk)  # a tensor that no longer fits
    with pytest.raises(ExportError, match="disk is full"):
        save_quantized(result.model, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # and no partial folder remains


@pytest.mark.parametrize("fmt", ["native", "gptq"])
@pytest.mark.parametrize("stage", ["tensors", "files", "reading weights"])  # the last: the check's reload
def test_a_cancelled_export_leaves_nothing(gptq_w4, tmp_path, stage, fmt):
    result, _ = gptq_w4
    out, old = tmp_path / "q", tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    for target, force in ((out, False), (old, True)):
        cancel, seen = CancelToken(), []

        def cancel_at_first(event):
            seen.append(event)
            if event.stage == stage:
                cancel.cancel()

        with pytest.raises(Cancelled):
            jobs.run(export(result.model, target, fmt=fmt, force=force, check=True, cancel=cancel), cancel_at_first)
        assert sum(e.stage == stage for e in seen) == 1  # stopped at the next unit of work
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no folder, no temporary folder
        assert [p.name for p in old.iterdir()] == ["keep.txt"]  # what it would have replaced is untouched


def test_a_checked_export_reports_its_files_and_comparison(gptq_w4, tmp_path):
    result, _ = gptq_w4
    events = []
    report = jobs.run(export(result.model, tmp_path / "q", check=True), events.append)
    assert report["path"] == str(tmp_path / "q") and report["max_abs_logit_diff"] == 0.0
    assert report["total_bytes"] == sum(p.stat().st_size for p in (tmp_path / "q").iterdir())
    assert [e.stage for e in events if e.stage in ("tensors", "files")][-1] == "files"
    assert [e.stage for e in events][-1] == "ready"  # the reload came last, before the rename


def test_preflight_refuses_with_the_numbers():
    with pytest.raises(InsufficientMemoryError, match=r"needs about .*model .* only .* free"):
        preflight("Quantizing x", {"model": 8 * 10**9, "working set": 10**9}, available=4 * 10**9)
    assert preflight("Quantizing x", {"model": 8 * 10**9}, available=4 * 10**9, force=True) == 8 * 10**9


def test_cli_quantize_then_generate_and_info(llada_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    profile = tmp_path / "profile.json"
    code = main(["quantize", str(llada_dir), "--method", "awq", "--wbits", "4", "--group-size", "32",
                 "--calib-samples", "4", "--seq-len", "32", "--out", str(out), "--profile-json", str(profile),
                 "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "block   1/2" in printed and "block   2/2" in printed and "bits per weight" in printed
    assert {"summary", "layers", "recipe", "events"} <= set(json.loads(profile.read_text()))
    assert main(["quantize", str(llada_dir), "--method", "rtn", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "hi", "--gen-length", "8"]) == 0
    assert main(["info", str(out)]) == 0


def test_cli_refuses_bad_recipes_before_loading(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nowhere"), "--method", "gptq", "--wbits", "5", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    # The recipe is refused, naming the impossible bit-width, before the missing model folder is even looked at.
    assert err.startswith("error: ") and "bits, not 5." in err and "nowhere" not in err


def test_loading_is_refused_when_the_weights_cannot_fit(llada_dir, monkeypatch, capsys):
    monkeypatch.setattr("dllm_studio.memory.available_bytes", lambda device="cpu": 10_000)
    with pytest.raises(InsufficientMemoryError, match="Loading .* needs about"):
        load_model(llada_dir)
    assert main(["generate", str(llada_dir), "--prompt", "hi"]) == 1
    assert "--no-memory-check" in capsys.readouterr().err
    assert main(["generate", str(llada_dir), "--prompt", "hi", "--gen-length", "4", "--no-memory-check"]) == 0


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_and_awq_beat_rtn_on_the_demo_model(bits):
    demo = load_model("demo")
    mean_error = {}
    for method in ("rtn", "gptq", "awq"):
        events = []
        jobs.run(quantize(demo, QuantRecipe(method=method, wbits=bits, calib_samples=16, seq_len=128)), events.append)
        errors = [e.relative_error for e in events if isinstance(e, LayerQuantized)]
        mean_error[method] = sum(errors) / len(errors)
    assert mean_error["gptq"] < mean_error["rtn"], mean_error
    assert mean_error["awq"] < mean_error["rtn"], mean_error


def test_act_order_survives_both_formats(llada, tmp_path):
    result = jobs.run(quantize(llada, QuantRecipe(method="gptq", wbits=3, act_order=True, symmetric=True, **FAST)))
    layer = result.model.module.get_submodule("model.transformer.blocks.0.q_proj")
    assert layer.g_idx is not None and not torch.equal(layer.column_groups(), torch.arange(64) // 32)
    ids = _prompt(llada)
    for fmt in ("native", "gptq"):
        out = save_quantized(result.model, tmp_path / fmt, fmt=fmt)
        assert torch.equal(load_model(out, dtype="float32").forward(ids), result.model.forward(ids)), fmt


def test_skip_patterns_and_clean_calibration_from_a_file(llada, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The capital of France is Paris. Seven plus five is twelve. " * 40)
    events = []
    recipe = QuantRecipe(method="gptq", wbits=4, group_size=32, calib=str(text), calib_samples=4, seq_len=32,
                         masked_calib=False, skip=("head", "down", "*.blocks.1.q_proj"))
    result = jobs.run(quantize(llada, recipe), events.append)
    module = result.model.module
    assert isinstance(module.get_submodule("model.transformer.blocks.0.ff_out"), torch.nn.Linear)
    assert isinstance(module.get_submodule("model.transformer.blocks.1.q_proj"), torch.nn.Linear)
    assert isinstance(module.get_submodule("model.transformer.blocks.1.k_proj"), QuantLinear)
    stats = [e for e in events if isinstance(e, LayerStats)]
    assert all(e.masked_outlier_ratio is None and e.unmasked_outlier_ratio is not None for e in stats)


def test_calibration_errors_are_specific(llada, tmp_path):
    from dllm_studio.errors import QuantizationError

    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(QuantizationError, match="tokens; one sequence"):
        jobs.run(quantize(llada, QuantRecipe(method="gptq", calib=str(short), calib_samples=2, seq_len=64)))
    with pytest.raises(QuantizationError, match="does not exist"):
        jobs.run(quantize(llada, QuantRecipe(method="gptq", calib=str(tmp_path / "nope.txt"))))
    with pytest.raises(QuantizationError, match="skips every linear"):
        jobs.run(quantize(llada, QuantRecipe(method="rtn", skip=("q", "k", "v", "o", "gate", "up", "down"))))


def test_modernbert_chat_quantizes_with_every_method(tmp_path):
    from test_modernbert_chat import make_modernbert_chat

    model = load_model(make_modernbert_chat(tmp_path / "mb"), dtype="float32")
    ids = _prompt(model)
    ref = model.forward(ids)
    for method in ("rtn", "gptq", "awq"):
        result = jobs.run(quantize(model, QuantRecipe(method=method, wbits=8, **FAST)))
        assert sum(isinstance(m, QuantLinear) for m in result.model.module.modules()) == len(
            [l for l in model.linear_layers() if l.role != "head"])
        assert float((result.model.forward(ids) - ref).norm() / ref.norm()) < 0.05


def test_diffusion_gemma_is_refused_with_the_reason(tmp_path, capsys):
    from dllm_studio.errors import QuantizationError
    from test_diffusion_gemma import make_diffusion_gemma

    folder = make_diffusion_gemma(tmp_path / "dg")
    with pytest.raises(QuantizationError, match="share their weights"):
        jobs.run(quantize(load_model(folder, dtype="float32"), QuantRecipe(method="rtn", **FAST)))
    assert main(["quantize", str(folder), "--method", "rtn", "--out", str(tmp_path / "o")]) == 1
    assert "share their weights" in capsys.readouterr().err


def test_the_head_is_rounded_when_not_skipped(llada):
    result = jobs.run(quantize(llada, QuantRecipe(method="gptq", skip=(), **FAST)))
    head = result.model.module.get_submodule("model.transformer.ff_out")
    assert isinstance(head, QuantLinear) and head.bits == 4
    assert isinstance(llada.module.get_submodule("model.transformer.ff_out"), torch.nn.Linear)


UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
SIZE_CHANGE = re.compile(r"([\d.]+) (B|KB|MB|GB|TB) \((\w+)\) → ([\d.]+) (B|KB|MB|GB|TB) = (\d+) % of (\w+)")


def assert_sizes_divide(text: str, lines: int = 2) -> list[str]:
    """Every size comparison in `text` names one baseline on both sides and its shown numbers divide to the
    shown percentage (within the rounding of two decimals); returns the baselines."""
    found = SIZE_CHANGE.findall(text)
    assert len(found) == lines, text
    for before, unit_b, baseline, after, unit_a, percent, baseline_again in found:
        assert baseline == baseline_again
        ratio = 100 * float(after) * UNITS[unit_a] / (float(before) * UNITS[unit_b])
        assert abs(ratio - int(percent)) <= 0.6, (text, ratio)
    return [f[2] for f in found]


def test_cli_quantize_and_model_card_sizes_state_one_baseline(llada_dir, tmp_path, capsys):
    assert main(["quantize", str(llada_dir), "--method", "rtn", "--wbits", "4", "--out", str(tmp_path / "w4"),
                 "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    # Packed linears against the same linears at bf16; the whole model against itself as held (float32).
    assert assert_sizes_divide(printed) == ["bf16", "float32"]
    assert assert_sizes_divide((tmp_path / "w4" / "README.md").read_text()) == ["bf16", "float32"]  # the model card
