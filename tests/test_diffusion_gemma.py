"""DiffusionGemma: a tiny random DiffusionGemmaForBlockDiffusion (dllm-models.md §4.1) run through the engine."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from dllm_studio.errors import Cancelled, InvalidSettingsError
from dllm_studio.events import CancelToken, DenoiseStep
from dllm_studio.jobs import run
from dllm_studio.models import MODEL_TYPES, load_model
from dllm_studio.models.diffusion_gemma import DiffusionGemma
from dllm_studio.sampling import GenerationConfig

# Gemma's first ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and Gemma 4's turn markers.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
CANVAS = 16


def make_diffusion_gemma(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Why is the sky blue? Because air scatters blue light more than red.", "Hello! How are you today?"]
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, global_head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                sliding_window=32, use_bidirectional_attention="vision", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                  intermediate_size=64)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS,
                                  boi_token_id=500, eoi_token_id=501, image_token_id=502)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config.eos_token_id = [1, tok.token_to_id("<turn|>")]
    model.save_pretrained(str(folder))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_diffusion_gemma(tmp_path_factory.mktemp("diffusiongemma-tiny-it"))


@pytest.fixture(scope="module")
def model(folder) -> DiffusionGemma:
    return load_model(folder, dtype="float32")


def workers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "diffusion-gemma-generate"]


def test_registry_key_is_the_real_model_type():
    from transformers import DiffusionGemmaConfig

    assert MODEL_TYPES[DiffusionGemmaConfig.model_type] == "diffusion_gemma:DiffusionGemma"


def test_info(model):
    info = model.info()
    assert isinstance(model, DiffusionGemma)
    assert (info.family, info.mask_token_id, info.shift_logits) == ("diffusion_gemma", None, False)
    assert (info.layers, info.hidden_size, info.vocab_size, info.context_length) == (2, 64, 512, 131072)
    assert info.dtype == "float32"
    lm = model.module.model
    # The ties survive save/load, and shared tensors are counted once.
    assert lm.decoder.layers[0].self_attn.q_proj.weight is lm.encoder.language_model.layers[0].self_attn.q_proj.weight
    assert model.module.lm_head.weight is lm.decoder.embed_tokens.weight
    assert info.parameters == sum(p.numel() for p in {id(p): p for p in model.module.parameters()}.values())
    assert set(model.stop_token_ids) == {1, model.tokenizer.convert_tokens_to_ids("<turn|>")}


def test_linear_layers(model):
    layers = model.linear_layers()
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names))
    weights = [id(model.module.get_submodule(n).weight) for n in names]
    assert len(weights) == len(set(weights))  # no linear listed twice under encoder and decoder names
    roles = lambda i: {n.rsplit(".", 1)[-1]: l.role for n, l in zip(names, layers) if l.block == i}  # noqa: E731
    dense = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "q_proj": "q", "k_proj": "k", "o_proj": "o"}
    assert roles(0) == {**dense, "v_proj": "v"}
    assert roles(1) == dense  # full-attention layers have no v_proj (K = V)
    assert [n for n, l in zip(names, layers) if l.role == "head"] == ["lm_head"]
    assert all(n.startswith("model.decoder.layers.") for n, l in zip(names, layers) if l.role != "head")


def test_logits_match_transformers(model, folder):
    from transformers import DiffusionGemmaForBlockDiffusion

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(folder), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompt, canvas = torch.randint(0, 400, (1, 7), generator=g), torch.randint(0, 512, (1, CANVAS), generator=g)
    with torch.no_grad():
        expected = hf(input_ids=prompt, decoder_input_ids=canvas).logits
        assert torch.equal(model.forward(canvas, prompt_ids=prompt), expected)
        assert torch.equal(model.forward(canvas, torch.ones_like(canvas), prompt_ids=prompt), expected)
        assert torch.equal(model.forward(canvas), hf(input_ids=torch.tensor([[2]]), decoder_input_ids=canvas).logits)
    assert expected.shape == (1, CANVAS, 512)


def test_chat_template(model, monkeypatch):
    tok = model.tokenizer
    render = lambda messages: tok.decode(model.chat_ids(messages))  # noqa: E731
    one = [{"role": "user", "content": "Why is the sky blue?"}]
    assert render(one) == "<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"
    three = one + [{"role": "assistant", "content": "Because of air."}, {"role": "user", "content": "Hello!"}]
    assert render(three) == ("<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\nBecause of air.<turn|>\n"
                             "<|turn>user\nHello!<turn|>\n<|turn>model\n")
    monkeypatch.setattr(tok, "chat_template", "{{ messages | length }} turns")  # the folder's template wins
    assert render(three) == "3 turns"
    monkeypatch.setattr(tok, "chat_template", None)  # and ours stands in for a missing one
    assert render(one) == "<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"


def test_generation(model):
    prompt = model.chat_ids([{"role": "user", "content": "Why is the sky blue?"}])
    # 24 tokens = 2 canvases of 16 (cut to 24); 8 steps = 4 per canvas; no EOS, so neither canvas ends early.
    config = GenerationConfig(gen_length=24, steps=8, temperature=0.5, seed=7, forbid_eos=True)
    events = []
    result = run(model.denoise(prompt, config), events.append)
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    assert [e.step for e in steps] == list(range(1, 9)) and {e.total_steps for e in steps} == {8}
    assert [e.block for e in steps] == [0] * 4 + [1] * 4
    assert all(len(e.tokens) == 24 for e in steps)
    assert set(range(CANVAS, 24)) <= set(steps[0].masked) and not steps[0].committed
    for e in steps:
        assert all(0 < c.confidence <= 1 and e.tokens[c.position] == c.token_id for c in e.committed)
        assert not {c.position for c in e.committed} & set(e.masked)
    assert list(steps[-1].tokens) == result.token_ids and len(result.token_ids) == 24
    assert not set(result.token_ids) & set(model.stop_token_ids)
    assert result.text == model.decode(result.token_ids)
    assert (result.stats.steps, result.stats.forward_passes, result.stats.answer_tokens) == (8, 8, 24)
    assert not workers_alive()

    again = run(model.denoise(prompt, config))
    assert again.token_ids == result.token_ids
    assert [s.tokens for s in again.steps] == [s.tokens for s in steps]
    other = run(model.denoise(prompt, dataclasses.replace(config, seed=8)))
    assert other.token_ids != result.token_ids


def test_drafts_become_steps():
    """Positions whose draft repeats are settled (committed once, with the probe's probability); the rest,
    and the canvases not started yet, are masked; tokens past gen_length are dropped."""
    from dllm_studio.models.diffusion_gemma import _DraftStreamer, _Probe, _Stop

    events, probe = [], _Probe([])
    streamer = _DraftStreamer(events.append, lambda: False, probe, gen_length=6, total_steps=4, pad_id=0)
    streamer.put(torch.tensor([[2, 9]]))  # the prompt
    probe.top = [0.9, 0.8, 0.7, 0.6]
    for draft in ([1, 2, 3, 4], [1, 5, 3, 4]):
        streamer.put_draft(torch.tensor([draft]))
    streamer.put(torch.tensor([[1, 5, 3, 4]]))  # the finished canvas
    for draft in ([7, 8, 7, 8], [7, 8, 6, 6]):
        streamer.put_draft(torch.tensor([draft]))
    steps = [e for _, e in events]
    assert [(e.step, e.block) for e in steps] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert [e.tokens for e in steps] == [(1, 2, 3, 4, 0, 0), (1, 5, 3, 4, 0, 0), (1, 5, 3, 4, 7, 8), (1, 5, 3, 4, 7, 8)]
    assert [e.masked for e in steps] == [(0, 1, 2, 3, 4, 5), (1, 4, 5), (4, 5), ()]
    assert [[(c.position, c.token_id, c.confidence) for c in e.committed] for e in steps] == \
        [[], [(0, 1, 0.9), (2, 3, 0.7), (3, 4, 0.6)], [], [(4, 7, 0.9), (5, 8, 0.8)]]
    streamer.should_stop = lambda: True  # cancelled: generate is ended at its next step
    with pytest.raises(_Stop):
        streamer.put_draft(torch.tensor([[7, 8, 6, 6]]))


def test_cancel_after_first_step(model):
    prompt = model.chat_ids([{"role": "user", "content": "Hello!"}])
    cancel, seen = CancelToken(), []

    def on_event(event):
        seen.append(event)
        cancel.cancel()

    with pytest.raises(Cancelled):
        run(model.denoise(prompt, GenerationConfig(gen_length=32, steps=8), cancel), on_event)
    assert len(seen) == 1 and not workers_alive()


def test_closing_the_job_early_stops_generate(model):
    prompt = model.chat_ids([{"role": "user", "content": "Hello!"}])
    job = model.denoise(prompt, GenerationConfig(gen_length=32, steps=8))
    assert isinstance(next(job), DenoiseStep)
    job.close()
    assert not workers_alive()


def test_refuses_settings_it_cannot_honour(model):
    with pytest.raises(InvalidSettingsError, match="classifier-free"):
        run(model.denoise([2, 10], GenerationConfig(cfg_scale=1.0)))
    with pytest.raises(InvalidSettingsError, match="empty"):
        run(model.denoise([], GenerationConfig()))
    for fast in (dict(cache="dual"), dict(threshold=0.9)):  # its own sampler has its own cache and acceptance rule
        with pytest.raises(InvalidSettingsError, match="--cache, --threshold and --factor do not apply"):
            model.check_settings(GenerationConfig(**fast))


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


def test_compare_runs_without_decision_flips_for_a_family_without_masks(model, tmp_path):
    """Teacher forcing hands a model masked states; DiffusionGemma denoises drafts, so compare leaves flips out."""
    import json

    from dllm_studio.compare import Candidate, compare
    from dllm_studio.eval.suites import load_suite

    suite = tmp_path / "few.jsonl"
    suite.write_text("".join(json.dumps(item) + "\n" for item in load_suite("qa").items[:2]))
    report = run(compare([Candidate("a", model), Candidate("b", model)], [suite], flips=True,
                         overrides={"gen_length": 16, "steps": 4}))
    assert [r["flipped_items"] for r in report["rows"]] == [None, None]
    assert report["notes"] == ["a: no decision flips (diffusion_gemma models, or the base, denoise without mask tokens).",
                               "b: no decision flips (diffusion_gemma models, or the base, denoise without mask tokens)."]
    assert report["items"]["few"][0]["flips"] == {}
