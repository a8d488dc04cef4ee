"""`dllm-studio export` end to end on the demo: quantize-and-export, format conversion, verification, refusals."""

import json

import pytest
import torch

from dllm_studio.cli import main
from dllm_studio.models import load_model
from dllm_studio.quant import export as export_module
from dllm_studio.quant.export import GPTQ_WEIGHT_ONLY, read_profile, verdict_text
from dllm_studio.quant.recipe import QuantRecipe

RECIPE = ["--method", "rtn", "--wbits", "4", "--calib-samples", "2", "--seq-len", "32"]
IDENTICAL = "Verified: reloaded model gives identical outputs"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A native RTN W4 folder of the demo, as `quantize` writes it."""
    out = tmp_path_factory.mktemp("export") / "native"
    assert main(["quantize", "demo", *RECIPE, "--out", str(out)]) == 0
    return out


def logits(folder) -> torch.Tensor:
    model = load_model(folder)
    with torch.inference_mode():
        return model.forward(torch.tensor([model.chat_ids(export_module.VERIFY_PROMPT)])).float()


def quant_method(folder) -> str:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]


def test_full_precision_with_a_recipe_is_quantized_exported_and_verified(capsys, tmp_path):
    out = tmp_path / "fp-to-native"
    code, stdout, _ = run_cli(capsys, "export", "demo", *RECIPE, "--out", out, "--verify")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[-1] == IDENTICAL
    assert f"exported {out} (native format)" in lines and any(l.startswith("  model.safetensors  ") for l in lines)
    assert lines[-2].startswith("total ")
    assert load_model(out).quantization == QuantRecipe(method="rtn", wbits=4, calib_samples=2, seq_len=32)


def test_quantize_verify_shares_the_path_and_keeps_its_output(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "quantize", "demo", *RECIPE, "--out", tmp_path / "q", "--verify")
    assert code == 0
    assert stdout.splitlines()[-2:] == [f"saved {tmp_path / 'q'} (native format)", IDENTICAL]
    assert stdout.startswith("  layer   1/28") and "\nblock   1/4" in stdout  # the quantizer's progress, as before


def test_native_folder_converts_to_gptq_and_back_with_identical_logits(capsys, tmp_path, native):
    gptq, back = tmp_path / "gptq", tmp_path / "back"
    code, stdout, _ = run_cli(capsys, "export", native, "--format", "gptq", "--out", gptq, "--verify")
    assert code == 0 and stdout.splitlines()[-1] == IDENTICAL
    assert quant_method(gptq) == "gptq"
    assert read_profile(gptq) == read_profile(native) != {}  # the folder's profile goes along
    reference = logits(native)
    # Measured: RTN W4's fp16 scales and integer zeros survive the GPTQ layout bit for bit on the demo.
    assert torch.equal(logits(gptq), reference)
    code, _, _ = run_cli(capsys, "export", gptq, "--format", "native", "--out", back)
    assert code == 0 and quant_method(back) == "dllm_studio"
    assert torch.equal(logits(back), reference)


def test_full_precision_without_a_recipe_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "demo", "--wbits", "4", "--out", tmp_path / "x")
    assert code == 1
    assert err == ("error: demo is not quantized: give a recipe (--method, --wbits) or a quantized folder.\n")
    assert not (tmp_path / "x").exists()


def test_a_recipe_for_a_quantized_folder_is_refused(capsys, tmp_path, native):
    code, _, err = run_cli(capsys, "export", native, "--method", "gptq", "--wbits", "3", "--out", tmp_path / "x")
    assert code == 1
    assert "already quantized (rtn 4-bit g128)" in err and "(--method --wbits) would quantize it twice" in err
    assert not (tmp_path / "x").exists()


def test_an_existing_out_is_refused_without_force_and_untouched(capsys, tmp_path, native):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "export", native, "--format", "gptq", "--out", out)
    assert code == 1 and "pass --force to replace it" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    code, _, _ = run_cli(capsys, "export", native, "--format", "gptq", "--out", out, "--force")
    assert code == 0 and not (out / "mine.txt").exists() and quant_method(out) == "gptq"


def test_w4a4_to_gptq_is_refused_before_loading(capsys, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model for an export the format refuses")

    monkeypatch.setattr("dllm_studio.models.load_model", no_load)
    code, _, err = run_cli(capsys, "export", "demo", *RECIPE, "--abits", "4", "--format", "gptq", "--out", tmp_path / "x")
    assert code == 1 and err == f"error: {GPTQ_WEIGHT_ONLY}\n"


def test_a_reload_that_predicts_another_token_exits_1(capsys, tmp_path, native, monkeypatch):
    report = {"max_abs_logit_diff": 2.5, "argmax_agrees": False, "argmax_disagreements": 3, "positions": 41}

    def differs(model, folder, cancel=None):
        return report
        yield  # a generator, as the engine's job is

    monkeypatch.setattr(export_module, "verification", differs)
    code, stdout, _ = run_cli(capsys, "export", native, "--out", tmp_path / "x", "--verify")
    assert code == 1 and stdout.splitlines()[-1] == verdict_text(report)[0]
    assert verdict_text(report) == ("Reloaded model differs: another token at 3 of 41 positions", False)


def test_verdict_wording():
    close = {"max_abs_logit_diff": 0.00123, "argmax_disagreements": 0, "positions": 41}
    assert verdict_text({**close, "max_abs_logit_diff": 0.0}) == (IDENTICAL, True)
    assert verdict_text(close) == ("Verified: same predicted token everywhere; logits differ by at most 0.00123", True)


def test_max_shard_size_writes_shards_that_reload_identically(capsys, tmp_path, native):
    out = tmp_path / "sharded"
    code, stdout, _ = run_cli(capsys, "export", native, "--out", out, "--max-shard-size", "500KB", "--verify")
    assert code == 0 and stdout.splitlines()[-1] == IDENTICAL
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert torch.equal(logits(out), logits(native))


def test_a_bad_max_shard_size_is_argparses_error_before_loading(capsys, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model for a shard size that cannot work")

    monkeypatch.setattr("dllm_studio.models.load_model", no_load)
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "demo", *RECIPE, "--out", str(tmp_path / "x"), "--max-shard-size", "5 gigs"])
    assert exit_.value.code == 2
    assert "argument --max-shard-size: '5 gigs' is not a size" in capsys.readouterr().err
