"""Streaming, sharded safetensors output: sizes, the shard plan, bytes against safetensors and huggingface_hub,
reading back, and quantized exports written in several shards."""

import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int  # not exported; the function save_torch_state_dict uses
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dllm_studio import checkpoint
from dllm_studio.errors import ExportError
from dllm_studio.models import load_model
from dllm_studio.quant.export import VERIFY_PROMPT, save_quantized, verify
from dllm_studio.shards import (INDEX_FILE, TensorEntry, entries_from_files, parse_size, plan_shards,
                                write_safetensors, write_sharded)

EVERY_DTYPE = {
    "f64": torch.arange(3, dtype=torch.float64), "f32": torch.randn(2, 3), "scalar": torch.tensor(3.5),
    "empty": torch.ones(0, 4), "bf16": torch.randn(5, dtype=torch.bfloat16), "f16": torch.randn(2, 2).half(),
    "i64": torch.arange(2), "i32": torch.arange(3, dtype=torch.int32), "i16": torch.arange(1, dtype=torch.int16),
    "i8": torch.tensor([-3], dtype=torch.int8), "u8": torch.arange(5, dtype=torch.uint8),
    "u16": torch.ones(1, dtype=torch.uint16), "u32": torch.ones(3, dtype=torch.uint32),
    "u64": torch.ones(1, dtype=torch.uint64), "bool": torch.tensor([True, False, True]),
    "f8a": torch.ones(3).to(torch.float8_e4m3fn), "f8b": torch.ones(3).to(torch.float8_e5m2),
}


def entries(state: dict) -> list[TensorEntry]:
    return [TensorEntry.of(name, tensor) for name, tensor in state.items()]


def floats(*sizes: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of the given byte sizes, named in order t0, t1, ..."""
    return {f"t{i}": torch.full((size // 4,), float(i)) for i, size in enumerate(sizes)}


@pytest.mark.parametrize("text", ["5GB", "500MB", "1.5GB", "10KB", "3tb", " 2 GB "])
def test_decimal_sizes_read_as_huggingface_hub_reads_them(text):
    assert parse_size(text) == parse_size_to_int(text)


def test_binary_units_plain_numbers_and_ints():
    assert [parse_size(t) for t in ("2GiB", "1KiB", "0.5MiB", "1000", "7B", 123)] == [
        2 * 2**30, 1024, 2**19, 1000, 7, 123]


@pytest.mark.parametrize("bad", ["", "GB", "5 gigabytes", "5XB", "-1GB", "1e3", "0", 0, -5, True, None])
def test_a_bad_or_non_positive_size_is_refused(bad):
    with pytest.raises(ExportError, match="size"):
        parse_size(bad)


def test_shards_fill_greedily_in_order_like_huggingface_hub(tmp_path):
    state = floats(24, 24, 8, 24, 8, 8)  # huggingface_hub's docstring example, in bytes
    shards = [[e.name for e in shard] for shard in plan_shards(entries(state), 40)]
    assert shards == [["t0"], ["t1", "t2"], ["t3", "t4", "t5"]]
    split = split_torch_state_dict_into_shards(state, max_shard_size=40)
    assert list(split.filename_to_tensors.values()) == shards


def test_a_tensor_over_the_limit_sits_alone_and_the_order_is_kept():
    shards = plan_shards(entries(floats(8, 48, 8, 8, 48)), 40)
    assert [[e.name for e in shard] for shard in shards] == [["t0"], ["t1"], ["t2", "t3"], ["t4"]]


def test_a_name_given_twice_is_refused():
    with pytest.raises(ExportError, match="t0 is given twice"):
        plan_shards(entries(floats(4)) * 2, 100)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_a_file_is_byte_identical_to_save_file(tmp_path, metadata):
    save_file(EVERY_DTYPE, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    size = write_safetensors(tmp_path / "ours.safetensors", entries(EVERY_DTYPE), metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "theirs.safetensors").read_bytes() and size == len(ours)
    readable = {k: v for k, v in EVERY_DTYPE.items() if k not in ("u16", "u32", "u64")}  # checkpoint's dtypes
    write_safetensors(tmp_path / "readable.safetensors", entries(readable), metadata)
    assert checkpoint.read_header(tmp_path / "readable.safetensors").keys() == readable.keys()


def test_a_sharded_folder_is_byte_identical_to_save_torch_state_dict(tmp_path):
    state = {"embed": torch.randn(4, 6), "norm": torch.ones(2, dtype=torch.bfloat16), "head": torch.randn(6, 4),
             "count": torch.tensor(7)}
    (tmp_path / "ours").mkdir()
    files = finish(write_sharded(tmp_path / "ours", entries(state), "100B", {"format": "pt"}))
    (tmp_path / "theirs").mkdir()
    save_torch_state_dict(state, tmp_path / "theirs", max_shard_size=100)
    names = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
             "model-00003-of-00003.safetensors", INDEX_FILE]
    assert [name for name, _ in files] == names == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    for name, size in files:
        ours = (tmp_path / "ours" / name).read_bytes()
        assert ours == (tmp_path / "theirs" / name).read_bytes() and size == len(ours), name
    index = json.loads((tmp_path / "ours" / INDEX_FILE).read_text())
    assert index == {"metadata": {"total_size": 96 + 4 + 96 + 8},
                     "weight_map": {"embed": names[0], "norm": names[0], "head": names[1], "count": names[2]}}
    assert checkpoint.tensor_shapes(tmp_path / "ours") == {k: tuple(v.shape) for k, v in state.items()}
    with safe_open(str(tmp_path / "ours" / names[1]), framework="pt") as f:  # what huggingface_hub's loader opens
        assert torch.equal(f.get_tensor("head"), state["head"]) and f.metadata() == {"format": "pt"}


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    files = finish(write_sharded(tmp_path, entries(EVERY_DTYPE), "5GB", {"format": "pt"}))
    assert [name for name, _ in files] == ["model.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) for k, v in EVERY_DTYPE.items())


def test_each_tensor_is_loaded_only_as_it_is_written(tmp_path):
    loads = []

    def lazy(name, tensor):
        return TensorEntry(name, tensor.dtype, tuple(tensor.shape), lambda: loads.append(name) or tensor)

    state = floats(8, 8, 8, 8)
    writing = write_sharded(tmp_path, [lazy(k, v) for k, v in state.items()], 16)
    progress = []
    for done, total in writing:
        progress.append((done, total, len(loads)))
    assert progress == [(1, 4, 1), (2, 4, 2), (3, 4, 3), (4, 4, 4)] and loads == ["t0", "t1", "t2", "t3"]


def test_files_are_copied_from_their_entries_without_loading_them_all(tmp_path):
    state = floats(8, 16, 8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    finish(write_sharded(tmp_path / "a", entries(state), 20, {"format": "pt"}))
    read = entries_from_files(checkpoint.weight_files(tmp_path / "a"))
    assert [(e.name, e.dtype, e.shape) for e in read] == [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    finish(write_sharded(tmp_path / "b", read, 20, {"format": "pt"}))
    assert all((tmp_path / "a" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "b").iterdir())


@pytest.mark.parametrize("loaded", [torch.zeros(3, dtype=torch.float16), torch.zeros(4)])
def test_a_tensor_that_loads_otherwise_than_announced_is_refused(tmp_path, loaded):
    entry = TensorEntry("w", torch.float32, (3,), lambda: loaded)
    with pytest.raises(ExportError, match=r"w was announced as torch.float32 \(3,\) but loaded as"):
        write_safetensors(tmp_path / "x.safetensors", [entry])


def test_metadata_must_be_text(tmp_path):
    with pytest.raises(ExportError, match="metadata maps text to text"):
        write_safetensors(tmp_path / "x.safetensors", entries(floats(4)), {"format": 1})


def finish(job):
    """What a write_sharded job returns, run to the end."""
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value


def _logits(folder):
    model = load_model(folder)
    with torch.inference_mode():
        return model.forward(torch.tensor([model.chat_ids(VERIFY_PROMPT)])).float()


@pytest.mark.parametrize("fmt", ["native", "gptq"])
def test_a_quantized_model_in_several_shards_reloads_identically(demo_rtn4, tmp_path, fmt):
    whole = save_quantized(demo_rtn4.model, tmp_path / "whole", fmt=fmt)
    size = (whole / "model.safetensors").stat().st_size
    sharded = save_quantized(demo_rtn4.model, tmp_path / "sharded", fmt=fmt, max_shard_size=size // 3)
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert not (sharded / "model.safetensors").exists()
    assert index["weight_map"].keys() == checkpoint.tensor_shapes(whole).keys()
    assert torch.equal(_logits(sharded), _logits(whole))
    assert verify(demo_rtn4.model, sharded)["max_abs_logit_diff"] == 0.0
