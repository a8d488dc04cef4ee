"""ModernBERT-chat: a tiny random ModernBertForMaskedLM saved like the dllm-hub folders, run through the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dllm_studio.errors import Cancelled, ModelLoadError
from dllm_studio.events import CancelToken, DenoiseStep
from dllm_studio.jobs import run
from dllm_studio.models import load_model
from dllm_studio.models.modernbert_chat import ModernBertChat
from dllm_studio.sampling import GenerationConfig

# ModernBERT's special tokens, in the order of the released tokenizer (ids 50280..50284 there).
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
CORPUS = ["[Question]\nWhat is the capital of France?\n[/Question]\n\n[Answer]\nParis.\n[/Answer]\n\n",
          "The sky is blue. A cat is a mammal. Hello, how are you today? 7 plus 5 is 12."]


def make_modernbert_chat(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import ModernBertConfig, ModernBertForMaskedLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(SPECIALS)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    cfg = ModernBertConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=256, global_attn_every_n_layers=3,
                           local_attention=16, pad_token_id=ids["[PAD]"], bos_token_id=ids["[CLS]"],
                           eos_token_id=ids["[SEP]"], cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"])
    torch.manual_seed(0)
    ModernBertForMaskedLM(cfg).save_pretrained(str(folder))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                            pad_token="[PAD]", mask_token="[MASK]").save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_modernbert_chat(tmp_path_factory.mktemp("ModernBERT-base-chat-v0.1"))


@pytest.fixture(scope="module")
def model(folder) -> ModernBertChat:
    return load_model(folder, dtype="float32")


def test_info(model, folder):
    info = model.info()
    assert isinstance(model, ModernBertChat)
    assert (info.family, info.dtype, info.shift_logits) == ("modernbert", "float32", False)
    assert (info.layers, info.hidden_size, info.vocab_size, info.context_length) == (3, 64, 320, 256)
    assert info.mask_token_id == model.tokenizer.convert_tokens_to_ids("[MASK]")
    assert info.parameters == sum(p.numel() for p in model.module.parameters())  # tied decoder counted once
    assert info.memory_bytes["W4"] < info.memory_bytes["bf16"]
    stops = {model.tokenizer.convert_tokens_to_ids(t) for t in ("[SEP]", "[PAD]")}
    assert set(model.stop_token_ids) == stops


def test_linear_layers(model):
    layers = model.linear_layers()
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names))
    by_name = {layer.name: layer for layer in layers}
    for i in range(3):
        roles = {n.removeprefix(f"model.layers.{i}."): by_name[n].role for n in names if f"layers.{i}." in n}
        assert roles == {"attn.Wqkv": "qkv", "attn.Wo": "o", "mlp.Wi": "gate_up", "mlp.Wo": "down"}
        assert all(by_name[n].block == i for n in names if f"layers.{i}." in n)
    assert {n for n in names if by_name[n].role == "head"} == {"head.dense", "decoder"}
    assert by_name["decoder"].block is None and by_name["decoder"].out_features == 320


def test_logits_match_transformers(model, folder):
    from transformers import ModernBertForMaskedLM

    hf = ModernBertForMaskedLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        assert torch.equal(model.forward(ids), hf(input_ids=ids).logits)
        assert torch.equal(model.forward(ids, mask), hf(input_ids=ids, attention_mask=mask).logits)
    assert model.forward(ids).shape == (2, 40, 320)


def test_chat_template(model):
    render = lambda messages: model.tokenizer.decode(model.chat_ids(messages))  # noqa: E731
    assert render([{"role": "user", "content": " What is 7 plus 5? "}]) == \
        "[Question]\nWhat is 7 plus 5?\n[/Question]\n\n[Answer]\n"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    assert render(conversation) == ("[SYS]\nBe brief.\n[/SYS]\n\n[Question]\nHi\n[/Question]\n\n"
                                    "[Answer]\nHello!\n[/Answer]\n\n[Question]\nCapital of France?\n[/Question]\n\n"
                                    "[Answer]\n")


def test_decode_stops_at_answer_end(model):
    tok = model.tokenizer
    ids = tok.encode("Paris.\n[/Answer]\n\n", add_special_tokens=False) + [tok.pad_token_id] * 3
    assert model.decode(ids) == "Paris."
    assert model.decode(tok.encode("Rome", add_special_tokens=False) + [tok.sep_token_id, 5, 6]) == "Rome"


def test_generation(model):
    prompt = model.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    config = GenerationConfig(gen_length=16, steps=8, block_length=8, temperature=0.7, seed=3)
    events = []
    result = run(model.denoise(prompt, config), events.append)
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    assert len(steps) == 8 and all(len(e.committed) == 2 for e in steps)
    assert not steps[-1].masked and model.mask_token_id not in result.token_ids
    assert len(result.token_ids) == 16 and result.stats.forward_passes == 8
    again = run(model.denoise(prompt, config))
    assert again.token_ids == result.token_ids


def test_cancel_after_first_step(model):
    prompt = model.chat_ids([{"role": "user", "content": "Hello"}])
    cancel, seen = CancelToken(), []

    def on_event(event):
        seen.append(event)
        cancel.cancel()

    with pytest.raises(Cancelled):
        run(model.denoise(prompt, GenerationConfig(gen_length=16, steps=8, block_length=8), cancel), on_event)
    assert len(seen) == 1


def test_refuses_pickle_only_and_incomplete_folders(folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    pickled = shutil.copytree(folder, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(pickled, dtype="float32")

    partial = shutil.copytree(folder, tmp_path / "partial")
    state = load_file(str(partial / "model.safetensors"))
    del state["model.final_norm.weight"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.final_norm.weight"):
        load_model(partial, dtype="float32")


def test_meta_load_describes_without_reading_weights(model, folder, tmp_path):
    import shutil

    garbled = shutil.copytree(folder, tmp_path / "garbled")
    shard = garbled / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64  # garbage tensor data; the header is intact
    shard.write_bytes(bytes(data))
    meta = load_model(garbled, dtype="float32", device="meta")
    assert all(p.is_meta for p in meta.module.parameters())
    assert dataclasses.replace(meta.info(), path="", source="") == dataclasses.replace(model.info(), path="", source="")


def test_a_kv_cache_is_refused_with_the_reason_and_parallel_decoding_works(model):
    """ModernBERT-chat runs transformers' own module, which takes no keys/values: the cache is refused by name,
    while threshold decoding (the sampler's alone) runs."""
    from dllm_studio.errors import InvalidSettingsError

    prompt = model.chat_ids([{"role": "user", "content": "Hi"}])
    with pytest.raises(InvalidSettingsError, match="dual cache needs a model whose forward takes a KV cache.*"
                                                   "ModernBertForMaskedLM, whose forward takes no past keys/values"):
        run(model.denoise(prompt, GenerationConfig(gen_length=8, steps=8, block_length=8, cache="dual")))
    result = run(model.denoise(prompt, GenerationConfig(gen_length=8, steps=8, block_length=8, threshold=0.01)))
    assert model.mask_token_id not in result.token_ids and result.stats.committed_tokens == 8
