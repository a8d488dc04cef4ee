"""The denoising sampler: LLaDA's algorithm, its remasking strategies, Dream's shift, events, cancel."""

import math

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.errors import Cancelled, InvalidSettingsError
from dllm_studio.events import CancelToken, DenoiseStep
from dllm_studio.models.base import DiffusionLM
from dllm_studio.sampling import GenerationConfig, check_prompt, confidence, denoise, transfer_counts


def reference_generate(model, prompt, steps, gen_length, block_length, mask_id, cfg_scale=0.0):
    """LLaDA's generate.py (temperature 0, low_confidence remasking), transcribed for comparison."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start, end = prompt.shape[1] + nb * block_length, prompt.shape[1] + (nb + 1) * block_length
        n = int((x[:, start:end] == mask_id).sum())
        num_transfer = [n // steps_per_block + (i < n % steps_per_block) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = model.forward(torch.cat([x, un_x])).chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model.forward(x)
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-math.inf, dtype=torch.float64))
            sel = conf[0].topk(num_transfer[i]).indices
            x[0, sel] = x0[0, sel]
    return x[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("gen,steps,block,cfg", [(16, 16, 16, 0.0), (24, 12, 8, 0.0), (16, 8, 4, 1.5)])
def test_matches_llada_reference_generate(llada, gen, steps, block, cfg):
    prompt = llada.chat_ids([{"role": "user", "content": "What is 7 plus 5?"}])
    config = GenerationConfig(gen_length=gen, steps=steps, block_length=block, cfg_scale=cfg)
    ours = jobs.run(denoise(llada, prompt, config))
    ref = reference_generate(llada, torch.tensor([prompt]), steps, gen, block, llada.mask_token_id, cfg)
    assert ours.token_ids == ref
    assert ours.stats.forward_passes == steps * (2 if cfg else 1)


def test_transfer_counts_split_equally():
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(8, 8) == [1] * 8
    assert transfer_counts(3, 5) == [1, 1, 1, 0, 0]
    assert sum(transfer_counts(37, 6)) == 37


def run_collect(model, config, prompt=None):
    events = []
    result = jobs.run(denoise(model, prompt or [1, 2, 3, 4, 5], config), events.append)
    return result, [e for e in events if isinstance(e, DenoiseStep)]


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_commits_are_final_and_complete(llada, remasking, temperature):
    config = GenerationConfig(gen_length=24, steps=12, block_length=8, remasking=remasking, temperature=temperature)
    result, steps = run_collect(llada, config)
    assert len(steps) == 12 and [s.step for s in steps] == list(range(1, 13))
    committed = [c.position for s in steps for c in s.committed]
    assert sorted(committed) == list(range(24))  # exactly gen_length commits, each position once
    seen = {}
    for s in steps:
        for c in s.committed:
            seen[c.position] = c.token_id
        for pos, tok in seen.items():  # never re-masked, never changed
            assert s.tokens[pos] == tok and pos not in s.masked
    # Equal split per block: 8 masks over 4 steps = 2 per step, blocks strictly left to right.
    for s in steps:
        assert len(s.committed) == 2
        assert all(s.block * 8 <= c.position < (s.block + 1) * 8 for c in s.committed)
    assert result.token_ids == list(steps[-1].tokens) and not steps[-1].masked


def test_deterministic_under_seed(llada):
    config = GenerationConfig(gen_length=16, steps=8, block_length=8, temperature=1.0, remasking="random", seed=7)
    a, b = jobs.run(denoise(llada, [1, 2, 3], config)), jobs.run(denoise(llada, [1, 2, 3], config))
    assert a.token_ids == b.token_ids
    others = {tuple(jobs.run(denoise(llada, [1, 2, 3], GenerationConfig(
        gen_length=16, steps=8, block_length=8, temperature=1.0, remasking="random", seed=s))).token_ids)
        for s in range(8, 12)}
    assert len(others | {tuple(a.token_ids)}) > 1  # the seed matters


class CraftedModel:
    """A stand-in DiffusionLM whose logits are fixed per answer position (vocab 0..3, mask 4)."""

    mask_token_id, stop_token_ids, context_length, family = 4, (3,), 64, "crafted"
    device, dtype = torch.device("cpu"), torch.float32
    no_kv_cache = "its logits are written by hand"
    module = torch.nn.Module()  # no quantized layers: no kernels to report

    def __init__(self, rows, prompt_len, shift_logits=False):
        self.rows, self.prompt_len, self.shift_logits = rows, prompt_len, shift_logits

    def forward(self, x):
        logits = torch.full((x.shape[0], x.shape[1], 5), -30.0)
        for i, row in enumerate(self.rows):
            logits[:, self.prompt_len + i - (1 if self.shift_logits else 0), :4] = torch.tensor(row).clamp_min(1e-9).log()
        return logits

    answer_length, check_settings = DiffusionLM.answer_length, DiffusionLM.check_settings

    def decode(self, ids):
        return " ".join(map(str, ids))


# Answer rows chosen so each strategy prefers a different position first:
# low_confidence -> 0 (p1 .60), margin -> 1 (p1 - p2 = .44), entropy -> 2 (H = .69).
ROWS = [[0.60, 0.20, 0.20, 0.00], [0.58, 0.14, 0.14, 0.14], [0.55, 0.45, 0.00, 0.00]]


@pytest.mark.parametrize("strategy,first", [("low_confidence", 0), ("margin", 1), ("entropy", 2)])
def test_each_strategy_commits_its_most_confident_position_first(strategy, first):
    model = CraftedModel(ROWS, prompt_len=2)
    _, steps = run_collect(model, GenerationConfig(gen_length=3, steps=3, block_length=3, remasking=strategy), [0, 1])
    assert [c.position for s in steps for c in s.committed] [0] == first
    assert all(c.token_id == 0 for s in steps for c in s.committed)


def test_confidence_values():
    logits = torch.tensor(ROWS, dtype=torch.float64).clamp_min(1e-12).log()
    tokens = torch.zeros(3, dtype=torch.long)
    assert confidence(logits, tokens, "low_confidence", None).tolist() == pytest.approx([0.60, 0.58, 0.55], abs=1e-6)
    assert confidence(logits, tokens, "margin", None).tolist() == pytest.approx([0.40, 0.44, 0.10], abs=1e-6)
    neg_entropy = [sum(p * math.log(p) for p in row if p > 0) for row in ROWS]
    assert confidence(logits, tokens, "entropy", None).tolist() == pytest.approx(neg_entropy, abs=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert confidence(logits, tokens, "random", g1).tolist() == confidence(logits, tokens, "random", g2).tolist()


def test_dream_shift_is_applied():
    """With shift_logits the model's row for position i - 1 predicts position i."""
    rows = [[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]]
    shifted = CraftedModel(rows, prompt_len=2, shift_logits=True)
    result, _ = run_collect(shifted, GenerationConfig(gen_length=3, steps=3, block_length=3), [0, 1])
    assert result.token_ids == [1, 2, 0]


def test_forbid_and_defer_eos():
    rows = [[0.05, 0.05, 0.05, 0.85], [0.5, 0.2, 0.2, 0.1], [0.2, 0.5, 0.2, 0.1]]  # token 3 is EOS
    model = CraftedModel(rows, prompt_len=1)
    plain, steps = run_collect(model, GenerationConfig(gen_length=3, steps=3, block_length=3), [0])
    assert plain.token_ids[0] == 3 and steps[0].committed[0].position == 0  # EOS first, it is most confident
    forbid, _ = run_collect(model, GenerationConfig(gen_length=3, steps=3, block_length=3, forbid_eos=True), [0])
    assert 3 not in forbid.token_ids
    defer, steps = run_collect(model, GenerationConfig(gen_length=3, steps=3, block_length=3, defer_eos=True), [0])
    assert defer.token_ids[0] == 3 and steps[-1].committed[0].position == 0  # EOS kept, but committed last


def test_cancel_between_steps(llada):
    cancel = CancelToken()
    events = []

    def on_event(event):
        events.append(event)
        cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(denoise(llada, [1, 2, 3], GenerationConfig(gen_length=16, steps=16, block_length=16), cancel), on_event)
    assert len(events) == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=16, steps=3, block_length=8), "cannot be split evenly over 2 blocks"),
    (dict(gen_length=16, steps=16, block_length=5), "not a multiple of block_length"),
    (dict(remasking="best"), "remasking must be one of"),
    (dict(temperature=-1), "must not be negative"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(InvalidSettingsError, match=message):
        GenerationConfig(**kwargs).validate()


def test_empty_prompt_and_context_overflow(llada):
    with pytest.raises(InvalidSettingsError, match="prompt is empty"):
        jobs.run(denoise(llada, [], GenerationConfig()))
    with pytest.raises(InvalidSettingsError, match="exceeds the model's context of 256"):
        jobs.run(denoise(llada, [1] * 250, GenerationConfig(gen_length=32, steps=32)))


def test_dream_generates_and_multi_turn_template(dream):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Add 2 and 3"}]
    text = dream.tokenizer.decode(dream.chat_ids(messages))
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                    "<|im_start|>user\nAdd 2 and 3<|im_end|>\n<|im_start|>assistant\n")
    result = jobs.run(dream.denoise(dream.chat_ids(messages), GenerationConfig(gen_length=8, steps=8, block_length=8)))
    assert len(result.token_ids) == 8 and result.stats.forward_passes == 8


def test_llada_chat_template_overrides_the_hub_one(llada):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert llada.tokenizer.decode(llada.chat_ids(messages)) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_decode_stops_at_first_stop_token(llada):
    eot = llada.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    ids = llada.tokenizer.encode("Paris", add_special_tokens=False)
    assert llada.decode(ids + [eot] + ids) == "Paris"


def test_answer_text_and_pieces_never_show_special_tokens(llada, dream, demo_model):
    """Chat-template tokens are added tokens flagged special, often missing from `all_special_ids`."""
    for model in (llada, dream, demo_model):
        flagged = [tid for tid, token in model.tokenizer.added_tokens_decoder.items() if token.special]
        assert model.token_pieces(flagged) == [""] * len(flagged)
        assert model.token_pieces(model.tokenizer.encode("Paris", add_special_tokens=False))[0]  # ordinary text kept
    header = llada.tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert header not in llada.tokenizer.all_special_ids  # the gap this closes
    paris = llada.tokenizer.encode("Paris", add_special_tokens=False)
    assert llada.decode(paris + [header] + paris) == "ParisParis"


def test_the_demo_answer_about_paris_keeps_its_template_tokens_out_of_text(demo_model):
    """The reported leak: after the end of the answer the demo commits `<|start_header_id|>` (position 17)."""
    prompt = demo_model.chat_ids([{"role": "user", "content": "Tell me about Paris."}])
    result = jobs.run(demo_model.denoise(prompt, GenerationConfig(gen_length=256, steps=256, block_length=32)))
    header = demo_model.tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert header in result.token_ids[result.stats.answer_tokens:]
    assert result.text == "d"
    assert not any("<|" in piece for piece in demo_model.token_pieces(result.token_ids))


def test_answer_tokens_count_up_to_the_first_stop_token(demo_model):
    prompt = demo_model.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    result = jobs.run(demo_model.denoise(prompt, GenerationConfig(gen_length=16, steps=16, block_length=16)))
    eot = demo_model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert result.text == "Paris" and result.token_ids.index(eot) == 3
    s = result.stats
    assert s.answer_tokens == 3 == demo_model.answer_length(result.token_ids)  # not gen_length 16
    assert s.answer_tokens_per_s == pytest.approx(3 / s.wall_time_s)
    stats = s.to_dict()
    assert (stats["answer_tokens"], stats["answer_tokens_per_s"]) == (3, s.answer_tokens_per_s)
    assert "tokens" not in stats and "tokens_per_s" not in stats  # the name says what was counted


def test_single_turn_models_are_shown_only_the_latest_message(demo_model, llada):
    history = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"}]
    latest = {"role": "user", "content": "What is 7 + 5?"}
    assert demo_model.single_turn and demo_model.config["single_turn"] is True  # the demo's config.json says so
    assert demo_model.chat_messages(history, "What is 7 + 5?") == [latest]
    assert not llada.single_turn
    assert llada.chat_messages(history, "What is 7 + 5?") == [*history, latest]


@pytest.mark.parametrize("prompt", ["", "   ", " \n\t "])
def test_blank_prompts_are_refused_before_tokenizing(prompt):
    with pytest.raises(InvalidSettingsError, match="^The prompt is empty.$"):
        check_prompt(prompt)
    check_prompt(" Hi ")  # no error
