"""Streaming quantization: blocks read from the shards one at a time, written to the output, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoints import make_llada
from dllm_studio import jobs
from dllm_studio.errors import Cancelled, FolderExistsError, QuantizationError
from dllm_studio.events import BlockQuantized, CancelToken, LayerQuantized, StreamingStarted
from dllm_studio.models import load_model
from dllm_studio.quant.export import save_quantized
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.streaming import PROGRESS, quantize_to_folder

CALIB = dict(calib_samples=4, seq_len=32)
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A LLaDA-shaped checkpoint of four blocks in three bf16 shards, as the hub lays it out."""
    return make_llada(tmp_path_factory.mktemp("llada-4-blocks"), shards=3, n_layers=4)


def described(folder: Path):
    return load_model(folder, dtype="float32", device="meta")


def stream(folder: Path, recipe: QuantRecipe, out: Path, events: list | None = None, **options):
    on_event = None if events is None else events.append
    return jobs.run(quantize_to_folder(described(folder), recipe, out, **options), on_event)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_output_matches_quantizing_in_memory(source, tmp_path, method):
    recipe = QuantRecipe(method=method, wbits=4, **CALIB)
    result, report = stream(source, recipe, tmp_path / "streamed")
    loaded = load_model(source, dtype="float32")
    in_memory = jobs.run(quantize(loaded, recipe))
    save_quantized(in_memory.model, tmp_path / "in-memory")
    ours, theirs = tensors(tmp_path / "streamed"), tensors(tmp_path / "in-memory")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():  # packed codes bit for bit; the rest at the source's bf16, exactly
        assert torch.equal(tensor.to(theirs[name].dtype), theirs[name]), name
    assert ours["model.transformer.ln_f.weight"].dtype == torch.bfloat16  # stored as the source stores it
    assert [r["relative_error"] for r in result.layers] == [r["relative_error"] for r in in_memory.layers]
    reloaded = load_model(tmp_path / "streamed", dtype="float32")
    assert torch.equal(reloaded.forward(PROMPT), in_memory.model.forward(PROMPT))
    assert result.summary["bits_per_weight"] == in_memory.summary["bits_per_weight"]
    assert report["path"] == str(tmp_path / "streamed") and not (tmp_path / ".streamed.partial").exists()


def test_only_one_block_is_ever_in_memory(source, tmp_path):
    model = described(source)
    real_blocks = []

    def count(event):
        if isinstance(event, LayerQuantized):
            real_blocks.append(sum(any(not t.is_meta for t in b.parameters()) for b in model.blocks()))
            real_blocks.append(not model.module.model.transformer.wte.weight.is_meta)

    jobs.run(quantize_to_folder(model, QuantRecipe(method="gptq", wbits=4, **CALIB), tmp_path / "out"), count)
    assert set(real_blocks[0::2]) == {1}  # the block being quantized, never another
    assert set(real_blocks[1::2]) == {False}  # the embedding was read for the calibration inputs only
    assert all(t.is_meta for t in model.module.parameters())  # and nothing is left behind


def test_a_killed_run_resumes_at_the_first_unfinished_block_and_writes_the_same_bytes(source, tmp_path):
    recipe = QuantRecipe(method="gptq", wbits=4, **CALIB)
    stream(source, recipe, tmp_path / "whole")
    cancel = CancelToken()

    def stop_after_two(event):
        if isinstance(event, BlockQuantized) and event.block == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(quantize_to_folder(described(source), recipe, tmp_path / "out", cancel=cancel), stop_after_two)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / ".out.partial" / PROGRESS).read_text())["blocks"] == 2
    events = []
    result, _ = stream(source, recipe, tmp_path / "out", events)
    started = next(e for e in events if isinstance(e, StreamingStarted))
    assert started.first_block == 3 and started.note.startswith("resumed")
    assert [e.block for e in events if isinstance(e, BlockQuantized)] == [3, 4]
    for name in ("model.safetensors", "config.json", "recipe.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert len(result.layers) == 4 * 7  # the finished blocks' records are carried over


def test_another_recipe_starts_over_and_says_so(source, tmp_path):
    cancel = CancelToken()
    stop = lambda e: cancel.cancel() if isinstance(e, BlockQuantized) else None  # noqa: E731
    with pytest.raises(Cancelled):
        jobs.run(quantize_to_folder(described(source), QuantRecipe(method="rtn", wbits=4, **CALIB), tmp_path / "out",
                                    cancel=cancel), stop)
    events = []
    stream(source, QuantRecipe(method="rtn", wbits=3, **CALIB), tmp_path / "out", events)
    started = next(e for e in events if isinstance(e, StreamingStarted))
    assert started.first_block == 1 and "recipe" in started.note and started.note.startswith("started over")
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["wbits"] == 3


def test_sharded_output_and_gptq_format(source, tmp_path):
    recipe = QuantRecipe(method="gptq", wbits=4, symmetric=True, **CALIB)
    _, report = stream(source, recipe, tmp_path / "out", fmt="gptq", max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert report["shards"] > 1 and len(set(index["weight_map"].values())) == report["shards"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    loaded = load_model(source, dtype="float32")
    in_memory = jobs.run(quantize(loaded, recipe)).model
    reloaded = load_model(tmp_path / "out", dtype="float32")
    # GPTQ stores fp16 scales as the native layout does: the same model either way
    assert torch.equal(reloaded.forward(PROMPT).argmax(-1), in_memory.forward(PROMPT).argmax(-1))


def test_refusals(source, tmp_path, demo_rtn4):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FolderExistsError):
        stream(source, QuantRecipe(method="rtn", **CALIB), tmp_path / "taken")
    with pytest.raises(QuantizationError, match="described on the meta device"):
        jobs.run(quantize_to_folder(load_model(source, dtype="float32"), QuantRecipe(method="rtn", **CALIB),
                                    tmp_path / "a"))
    folder = save_quantized(demo_rtn4.model, tmp_path / "quantized")
    with pytest.raises(QuantizationError, match="quantized already"):
        stream(folder, QuantRecipe(method="rtn", **CALIB), tmp_path / "b")


def test_a_memory_budget_is_planned_from_the_shards_as_from_memory(source):
    from dllm_studio.quant.budget import budget_plan
    from dllm_studio.quant.streaming import FromShards

    recipe = QuantRecipe(method="gptq", wbits=4, target_bpw=3.5, **CALIB)
    model = described(source)
    streamed = jobs.run(budget_plan(model, recipe, store=FromShards(model)))
    in_memory = jobs.run(budget_plan(load_model(source, dtype="float32"), recipe))
    assert streamed.bits == in_memory.bits and len(set(streamed.bits.values())) > 1
    assert all(t.is_meta for t in model.module.parameters())


def test_cli_streams_and_refuses_verify(source, tmp_path, capsys):
    from dllm_studio.cli import main

    out = tmp_path / "out"
    flags = ["quantize", str(source), "--method", "rtn", "--wbits", "4", "--calib-samples", "4", "--seq-len", "32",
             "--out", str(out), "--streaming", "on", "--dtype", "float32"]
    assert main([*flags, "--verify"]) == 1
    assert "--verify compares the written folder" in capsys.readouterr().err and not out.exists()
    assert main(flags) == 0
    printed = capsys.readouterr().out
    assert "streaming from 3 shards: blocks 1-4 of 4" in printed and "block   4/4" in printed
    assert load_model(out, dtype="float32").config["quantization_config"]["bits"] == 4


def test_cli_auto_streams_only_when_memory_is_short(source, tmp_path, capsys, monkeypatch):
    from dllm_studio import memory
    from dllm_studio.cli import main

    flags = ["quantize", str(source), "--method", "rtn", "--wbits", "4", "--calib-samples", "4", "--seq-len", "32",
             "--dtype", "float32"]
    assert main([*flags, "--out", str(tmp_path / "roomy")]) == 0
    assert "streaming from" not in capsys.readouterr().out
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 200_000)  # less than the in-memory run needs
    assert main([*flags, "--out", str(tmp_path / "short"), "--no-memory-check"]) == 0
    captured = capsys.readouterr()
    assert "streaming blocks from the shards instead" in captured.err and "streaming from 3 shards" in captured.out
