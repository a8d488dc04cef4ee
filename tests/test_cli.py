"""The CLI end to end: info and generate on tiny checkpoints, and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from checkpoints import make_llada
from dllm_studio.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_table_and_json(capsys, llada_dir):
    code, out, _ = run_cli(capsys, "info", llada_dir)
    assert code == 0
    for field in ("family", "parameters", "layers", "hidden size", "vocabulary", "mask token id",
                  "context length", "memory bf16", "memory W8", "memory W4", "memory W3", "memory W2"):
        assert field in out
    code, out, _ = run_cli(capsys, "info", llada_dir, "--json")
    info = json.loads(out)
    assert info["family"] == "llada" and info["layers"] == 2 and info["hidden_size"] == 64
    assert set(info["memory_bytes"]) == {"bf16", "W8", "W4", "W3", "W2"}


def test_generate_json_has_text_stats_and_steps(capsys, dream_dir):
    code, out, _ = run_cli(capsys, "generate", dream_dir, "--prompt", "Hello there", "--gen-length", 16,
                           "--steps", 8, "--block-length", 8, "--json", "--dtype", "float32")
    assert code == 0
    data = json.loads(out)
    assert len(data["answer_token_ids"]) == 16 and len(data["steps"]) == 8
    assert data["stats"]["forward_passes"] == 8 and data["stats"]["ms_per_step"] > 0
    assert sum(len(s["committed"]) for s in data["steps"]) == 16
    assert {"position", "token_id", "confidence"} <= set(data["steps"][0]["committed"][0])


def test_generate_show_steps_prints_every_step_with_masks(capsys, llada_dir):
    code, out, err = run_cli(capsys, "generate", llada_dir, "--prompt", "Hi", "--gen-length", 8, "--steps", 4,
                             "--block-length", 8, "--show-steps")
    assert code == 0
    assert [l for l in out.splitlines() if l.startswith("step ")] == [
        f"step {i}/4 (block 0, {8 - 2 * i} masked)" for i in range(1, 5)]
    assert "░" in out  # masked positions are visible in the early steps
    assert "4 steps, 4 forward passes" in err


def test_generate_is_reproducible_with_seed_and_the_seed_matters(capsys, llada_dir):
    def answer(seed):
        code, out, _ = run_cli(capsys, "generate", llada_dir, "--prompt", "Hi", "--gen-length", 8, "--steps", 8,
                               "--temperature", 1.0, "--seed", seed, "--json")
        assert code == 0
        return json.loads(out)["answer_token_ids"]

    first = answer(3)
    assert answer(3) == first
    assert answer(4) != first  # at temperature 1 another seed samples another answer


def test_generate_text_and_steps_never_show_template_tokens(capsys):
    """The demo commits <|start_header_id|> after its answer to this prompt (see test_sampling)."""
    args = ["generate", "demo", "--prompt", "Tell me about Paris.", "--gen-length", 256, "--steps", 256,
            "--block-length", 32]
    code, out, err = run_cli(capsys, *args, "--show-steps")
    assert code == 0 and "<|" not in out
    assert out.splitlines()[-1] == "d"  # the answer, after the last step's tokens
    code, out, _ = run_cli(capsys, *args, "--json")
    data = json.loads(out)
    assert data["text"] == "d" and 3 in data["answer_token_ids"]  # id 3: <|start_header_id|>


def test_generate_stats_count_answer_tokens_not_gen_length(capsys):
    code, out, err = run_cli(capsys, "generate", "demo", "--prompt", "What is the capital of France?",
                             "--gen-length", 16, "--steps", 16, "--block-length", 16)
    assert code == 0 and out == "Paris\n"
    assert ", 3 answer tokens, " in err  # "Paris" is 3 tokens; the other 13 of gen_length 16 are end-of-text


def assert_one_line_error(err, message):
    """The error is one line, last on stderr (after any progress lines), with no traceback."""
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert err.count("error: ") == 1 and "Traceback" not in err


def corrupt(kind, folder):
    """Damage a copy of a good checkpoint in one specific way."""
    shard = folder / "model-00001-of-00002.safetensors"
    if kind == "no config":
        (folder / "config.json").unlink()
    elif kind == "unknown model_type":
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="gpt2", auto_map=None)
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif kind == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt header":
        data = bytearray(shard.read_bytes())
        data[8:20] = b"\x00garbage!!\xff\xfe"
        shard.write_bytes(bytes(data))
    elif kind == "missing shard":
        shard.unlink()
    elif kind == "shape":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["mlp_hidden_size"] = 128
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "pickle only":
        for f in folder.glob("*.safetensors*"):
            f.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")


@pytest.mark.parametrize("kind,message", [
    ("no config", "has no config.json"),
    ("unknown model_type", "model_type 'gpt2' is not a dLLM family"),
    ("no tokenizer", "has no tokenizer"),
    ("truncated", "model-00001-of-00002.safetensors is truncated"),
    ("corrupt header", "model-00001-of-00002.safetensors is not a valid safetensors file"),
    ("missing shard", "shard model-00001-of-00002.safetensors named in model.safetensors.index.json is missing"),
    ("shape", "tensor model.transformer.blocks.0.ff_proj.weight has shape [160, 64] but config.json implies [128, 64]"),
    ("pickle only", "holds only pickle-format weights (pytorch_model.bin)"),
])
def test_bad_model_folders_get_one_line_errors(capsys, tmp_path, llada_dir, kind, message):
    folder = tmp_path / "model"
    shutil.copytree(llada_dir, folder)
    corrupt(kind, folder)
    code, out, err = run_cli(capsys, "info", folder)
    assert code == 1 and out == ""
    assert_one_line_error(err, message)


@pytest.mark.parametrize("argv,message", [
    (["generate", "{dir}", "--prompt", "Hi", "--gen-length", 64, "--steps", 3], "steps 3 cannot be split evenly over 2 blocks"),
    (["generate", "{dir}", "--prompt", "  "], "The prompt is empty."),
    (["generate", "{dir}", "--prompt", " \n\t "], "The prompt is empty."),
    (["info", "/no/such/folder"], "No model folder at /no/such/folder"),
])
def test_bad_arguments_get_one_line_errors(capsys, llada_dir, argv, message):
    code, _, err = run_cli(capsys, *[str(a).replace("{dir}", str(llada_dir)) for a in argv])
    assert code == 1
    assert_one_line_error(err, message)


def test_console_script_runs_as_a_module(llada_dir):
    """The real entry point in a fresh interpreter: python -m dllm_studio."""
    proc = subprocess.run([sys.executable, "-m", "dllm_studio", "generate", str(llada_dir), "--prompt", "Hi",
                           "--gen-length", "8", "--steps", "8", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["answer_token_ids"]) == 8
    bad = subprocess.run([sys.executable, "-m", "dllm_studio", "info", "/no/such/folder"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_unreadable_weights_never_fall_back_to_pickle(tmp_path):
    """A folder with both formats loads the safetensors; the .bin is never opened."""
    from dllm_studio.checkpoint import weight_files

    folder = make_llada(tmp_path / "both", shards=1)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code")
    assert [f.name for f in weight_files(folder)] == ["model.safetensors"]


def test_quantize_says_its_loading_stages_once(capsys, tmp_path):
    # The recipe is checked against a description of the model first; only the real load reports.
    code, _, err = run_cli(capsys, "quantize", "demo", "--method", "rtn", "--calib-samples", 2, "--seq-len", 32,
                           "--out", tmp_path / "q")
    assert code == 0
    lines = err.splitlines()
    assert lines.count("ready") == 1 and sum(line.startswith("loading llada weights") for line in lines) == 1
    assert lines.count("reading weights 39/39") == 1  # not a terminal: only the finished count, once
    from dllm_studio.memory import available_bytes, human, largest_part
    from dllm_studio.models import load_model
    from dllm_studio.quant.pipeline import working_set
    from dllm_studio.quant.recipe import QuantRecipe

    parts = working_set(load_model("demo", device="meta"), QuantRecipe(method="rtn", calib_samples=2, seq_len=32))
    said = next(line for line in lines if line.startswith("memory: "))
    assert said.startswith(f"memory: needs about {human(sum(parts.values()))} ({largest_part(parts)}); ")
    assert said.endswith(" free") and human(available_bytes()).split()[1] in said


def test_cli_errors_name_the_flag_that_changes_the_outcome(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    code, _, err = run_cli(capsys, "quantize", "demo", "--method", "rtn", "--out", tmp_path / "q")
    assert code == 1 and err == f"error: {tmp_path / 'q'} already exists. Choose another --out or pass --force to replace it.\n"
