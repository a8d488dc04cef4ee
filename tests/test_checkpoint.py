"""Checkpoints are not trusted: every way a folder can lie about its weights is refused by name, never hangs.

Each test damages a copy of a tiny LLaDA (or Dream) checkpoint in one way and expects the one-line error
that names the file and the tensor, through `load_model` and through the CLI. Cases that used to hang
(FIFOs, absurd configs) run the CLI in a subprocess with a timeout, so a regression fails instead of hanging.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_dream
from dllm_studio import jobs
from dllm_studio.errors import ModelLoadError, QuantizationError
from dllm_studio.events import LoadWarning
from dllm_studio.models import load_model
from test_cli import assert_one_line_error, run_cli

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def folder(tmp_path, llada_dir):
    """A fresh copy of the tiny two-shard LLaDA checkpoint, to damage."""
    return Path(shutil.copytree(llada_dir, tmp_path / "model"))


def refused(folder, message):
    """The folder is refused with `message`, by the loader and, as one line with exit 1, by `info`."""
    with pytest.raises(ModelLoadError) as caught:
        load_model(folder, dtype="float32")
    assert message in str(caught.value)
    return str(caught.value)


def refused_by_cli(capsys, folder, message, command="info"):
    code, out, err = run_cli(capsys, command, folder)
    assert code == 1 and out == ""
    assert_one_line_error(err, message)


def cli_subprocess(*argv, timeout=90):
    """The CLI in a fresh interpreter, from this checkout, killed if it hangs."""
    return subprocess.run([sys.executable, "-m", "dllm_studio", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def edit_tensors(folder, **tensors):
    """Replace tensors by name (dots as double underscores) in whichever shard holds them."""
    named = {k.replace("__", "."): v for k, v in tensors.items()}
    for shard in (folder / SHARD1, folder / SHARD2):
        state = load_file(str(shard))
        hits = {n: t for n, t in named.items() if n in state}
        if hits:
            save_file({**state, **hits}, str(shard), metadata={"format": "pt"})


def rewrite_header(shard, edit):
    """Replace the safetensors header by `edit(header)`, keeping the tensor data bytes as they are."""
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(edit(json.loads(data[8:8 + length]))).encode()
    shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])


def set_index(folder, shard_name):
    """Make the index point every tensor of the first shard at `shard_name`."""
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: shard_name if v == SHARD1 else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


# ---- shards outside the folder ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_outside_the_folder_is_refused(capsys, tmp_path, folder, how):
    outside = tmp_path / "elsewhere" / SHARD1
    outside.parent.mkdir()
    shutil.copy(folder / SHARD1, outside)  # a valid shard: only its place is wrong
    if how == "dotdot":
        set_index(folder, f"../elsewhere/{SHARD1}")
        named = f"shard '../elsewhere/{SHARD1}' resolves to {outside}, outside the model folder"
    elif how == "absolute":
        set_index(folder, str(outside))
        named = f"shard '{outside}' resolves to {outside}, outside the model folder"
    else:
        (folder / SHARD1).unlink()
        (folder / SHARD1).symlink_to(outside)
        named = f"shard '{SHARD1}' resolves to {outside}, outside the model folder"
    message = refused(folder, named)
    assert message.startswith(f"{folder / INDEX}: ")
    refused_by_cli(capsys, folder, named)


def test_single_file_symlinked_out_of_the_folder_is_refused(tmp_path, folder):
    outside = tmp_path / "other.safetensors"
    shutil.copy(folder / SHARD1, outside)
    for name in (SHARD1, SHARD2, INDEX):
        (folder / name).unlink()
    (folder / "model.safetensors").symlink_to(outside)
    refused(folder, f"{folder / 'model.safetensors'} resolves to {outside}, outside the model folder")


# ---- malformed safetensors headers -----------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda h: list(h), f"{SHARD1} is not a valid safetensors file (its header is a JSON list, not an object)"),
    (lambda h: 7, f"{SHARD1} is not a valid safetensors file (its header is a JSON int, not an object)"),
    (lambda h: {**h, "model.transformer.wte.weight": {**h["model.transformer.wte.weight"], "shape": [-320, -64]}},
     f"{SHARD1} is corrupt: the header entry for model.transformer.wte.weight is malformed"),
    (lambda h: {**h, "model.transformer.wte.weight": {**h["model.transformer.wte.weight"], "shape": [True, 64]}},
     f"{SHARD1} is corrupt: the header entry for model.transformer.wte.weight is malformed"),
    # Two tensors of one shape claiming the same bytes: accepted by the header-only (meta) checks before.
    (lambda h: {**h, "model.transformer.blocks.0.attn_out.weight": {
        **h["model.transformer.blocks.0.attn_out.weight"],
        "data_offsets": h["model.transformer.blocks.0.q_proj.weight"]["data_offsets"]}},
     f"{SHARD1} is corrupt: tensors model.transformer.blocks.0.attn_out.weight and "
     "model.transformer.blocks.0.q_proj.weight overlap in the file"),
])
def test_malformed_header_is_refused(capsys, folder, edit, message):
    rewrite_header(folder / SHARD1, edit)
    refused(folder, message)
    refused_by_cli(capsys, folder, message)  # `info` reads headers only, on the meta device


# ---- tensors of the wrong kind -----------------------------------------------------------------------

@pytest.mark.parametrize("name,tensor,dtype", [
    ("model.transformer.ln_f.weight", torch.ones(64, dtype=torch.bool), "BOOL"),  # used to be read as 1.0
    ("model.transformer.blocks.0.q_proj.weight", torch.zeros(64, 64, dtype=torch.int64), "I64"),
])
def test_non_float_tensor_where_floats_belong_is_refused(capsys, folder, name, tensor, dtype):
    edit_tensors(folder, **{name.replace(".", "__"): tensor})
    message = f"tensor {name} is stored as {dtype}, but the model expects floating-point values there"
    shard = SHARD2 if "ln_f" in name else SHARD1
    assert refused(folder, message).startswith(f"{shard}: ")
    refused_by_cli(capsys, folder, message)


def test_float_tensor_where_packed_codes_belong_is_refused(tmp_path, llada):
    """Integer tensors are right only where the module has integer buffers, and only integers are right there."""
    from dllm_studio.quant.export import save_quantized
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    result = jobs.run(quantize(llada, QuantRecipe(method="rtn", wbits=4, calib_samples=2, seq_len=32)))
    out = tmp_path / "w4"
    save_quantized(result.model, out)
    assert load_model(out).quantization is not None  # its uint8 codes load
    shard = next(out.glob("*.safetensors"))
    state = load_file(str(shard))
    name = "model.transformer.blocks.0.q_proj.qweight"
    state[name] = state[name].to(torch.float16)
    save_file(state, str(shard), metadata={"format": "pt"})
    refused(out, f"tensor {name} is stored as F16, but the model expects integer values there")


# ---- files that are not files ----------------------------------------------------------------------------

@pytest.mark.parametrize("target,kind", [
    ("tokenizer_config.json", "a named pipe (FIFO)"),
    ("config.json", "a named pipe (FIFO)"),
    (SHARD2, "a named pipe (FIFO)"),
    ("model.safetensors", "a device"),
])
def test_non_regular_file_is_refused_without_hanging(folder, target, kind):
    path = folder / target
    path.unlink(missing_ok=True)
    if kind == "a device":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    proc = cli_subprocess("info", folder)  # used to block forever opening the FIFO
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line_error(proc.stderr, f"{path} is {kind}, not a regular file")


# ---- absurd sizes in config.json -------------------------------------------------------------------------

@pytest.mark.parametrize("family,field", [("llada", "n_layers"), ("dream", "num_hidden_layers")])
def test_absurd_layer_count_is_refused_in_under_a_second(tmp_path, llada_dir, dream_dir, family, field):
    folder = Path(shutil.copytree(llada_dir if family == "llada" else dream_dir, tmp_path / "model"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, field: 10**9}))
    # Timed from after the imports (torch alone takes seconds to import on a busy machine).
    timed = ("import sys, time; from dllm_studio.cli import main; import dllm_studio.hub, dllm_studio.threads, "
             "dllm_studio.models.llada, dllm_studio.models.dream; start = time.perf_counter(); "
             "code = main(['info', sys.argv[1]]); print(code, time.perf_counter() - start)")
    proc = subprocess.run([sys.executable, "-c", timed, str(folder)], capture_output=True, text=True, timeout=90,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})  # used to hang building 10^9 blocks
    code, seconds = proc.stdout.split()
    assert code == "1" and float(seconds) < 1.0, proc.stderr
    assert_one_line_error(proc.stderr, f"config.json: {field}=1,000,000,000 cannot be right: the weights hold only")


@pytest.mark.parametrize("overrides,message", [
    ({"d_model": 10**9}, "d_model=1,000,000,000 cannot be right: no tensor in the weights has a dimension that large "
                         "(the largest is 320)"),
    ({"vocab_size": 10**12}, "vocab_size=1,000,000,000,000 cannot be right"),
    ({"embedding_size": 10**12, "vocab_size": 10**12}, "cannot be right: no tensor in the weights"),
    ({"n_heads": 0}, "n_heads must be a positive whole number, not 0"),
    ({"n_layers": "many"}, "n_layers must be a positive whole number, not 'many'"),
])
def test_impossible_config_sizes_are_refused(capsys, folder, overrides, message):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **overrides}))
    assert refused(folder, message).startswith(f"{folder}/config.json: ")
    refused_by_cli(capsys, folder, message)


def test_nested_config_sizes_are_bounded_too(tmp_path):
    from dllm_studio.checkpoint import check_config_sizes

    folder = make_dream(tmp_path / "dream", shards=1)
    with pytest.raises(ModelLoadError, match=r"config.json: hidden_size=1,000,000 cannot be right"):
        check_config_sizes(folder, {"text_config": {"hidden_size": 10**6}})


# ---- NaN and infinite weights ------------------------------------------------------------------------------

def poison(folder):
    q = torch.randn(64, 64)
    q[3, 5] = float("nan")
    edit_tensors(folder, model__transformer__blocks__0__q_proj__weight=q,
                 model__transformer__ln_f__weight=torch.full((64,), float("inf")))


def test_nan_weights_warn_at_load_and_refuse_to_quantize(folder):
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    poison(folder)
    events = []
    model = load_model(folder, dtype="float32", on_event=events.append)
    warnings = [e for e in events if isinstance(e, LoadWarning)]
    assert [w.tensors for w in warnings] == [("model.transformer.blocks.0.q_proj.weight", "model.transformer.ln_f.weight")]
    assert warnings[0].message == (f"{folder}: tensor model.transformer.blocks.0.q_proj.weight and 1 more holds NaN or "
                                   "infinite values; the model's answers will be meaningless and it cannot be quantized.")
    with pytest.raises(QuantizationError) as caught:  # used to fail inside GPTQ with a traceback about the Hessian
        jobs.run(quantize(model, QuantRecipe(method="gptq", wbits=4, calib_samples=2, seq_len=32)))
    assert "tensor model.transformer.blocks.0.q_proj.weight (and 1 more) holds NaN or infinite values" in str(caught.value)


def test_nan_weights_cli_warns_then_refuses_quantize(capsys, tmp_path, folder):
    poison(folder)
    code, out, err = run_cli(capsys, "quantize", folder, "--method", "gptq", "--calib-samples", 2, "--seq-len", 32,
                             "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert "warning: " + f"{folder}: tensor model.transformer.blocks.0.q_proj.weight and 1 more holds NaN" in err
    assert_one_line_error(err, "cannot be quantized: tensor model.transformer.blocks.0.q_proj.weight (and 1 more) "
                               "holds NaN or infinite values")


def test_finite_checkpoint_loads_without_warnings(llada_dir):
    events = []
    load_model(llada_dir, dtype="float32", on_event=events.append)
    assert not [e for e in events if isinstance(e, LoadWarning)]
