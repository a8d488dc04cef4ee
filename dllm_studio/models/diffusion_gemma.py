"""DiffusionGemma (google/diffusiongemma-26B-A4B-it): transformers' native block-diffusion Gemma 4.

It has no mask token. The answer is made canvas by canvas (`canvas_length` tokens each): a canvas starts as
uniform random tokens and the model's own entropy-bound sampler refines it for up to `max_denoising_steps`
steps, re-noising the tokens it does not accept; the causal encoder then writes the finished canvas into the
KV cache that the bidirectional decoder reads for the next one. So this family does not use the generic
sampler: `denoise` runs `generate` in a worker thread, and a streamer turns each step's draft (the argmax
canvas) into a `DenoiseStep`.

Encoder and decoder layers share their weights, and every layer has a parallel MoE whose experts are 3-D
Parameters rather than nn.Linear; `linear_layers` lists each dense linear once, under the decoder.

Reference: transformers 5.24 models/diffusion_gemma (generation_diffusion_gemma.py: `generate`, the streamer
calls `put(prompt)`, `put_draft(argmax_canvas)` per step, `put(canvas)` per canvas, then `end()`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dllm_studio.checkpoint import read_config
from dllm_studio.errors import Cancelled, InvalidSettingsError
from dllm_studio.events import CancelToken, Commit, DenoiseStep, Event
from dllm_studio.models.base import LLAMA_LINEAR_ROLES, DiffusionLM, LinearLayer, load_transformers_model, special_ids
from dllm_studio.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from dllm_studio.sampling import GenerationConfig, GenerationResult


# Gemma 4's turn format, used only if the folder's tokenizer ships no template of its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


class DiffusionGemma(DiffusionLM):
    family = "diffusion_gemma"
    linear_roles = LLAMA_LINEAR_ROLES
    head_names = ("lm_head",)
    chat_template = CHAT_TEMPLATE
    not_quantizable = ("its encoder and decoder stacks share their weights, so a block cannot be replaced in one "
                       "stack alone; quantizing DiffusionGemma is not supported yet")
    no_kv_cache = "it generates with transformers' own block-diffusion sampler, which manages its own cache"

    @classmethod
    def load(cls, folder: Path, *, source: str, dtype: torch.dtype, device: torch.device) -> DiffusionGemma:
        from transformers import DiffusionGemmaForBlockDiffusion

        config = read_config(folder)
        tokenizer = load_tokenizer(folder)
        module = load_transformers_model(DiffusionGemmaForBlockDiffusion, folder, dtype, device)
        text = module.config.text_config
        eos = _ids(text.eos_token_id) + _ids(getattr(module.generation_config, "eos_token_id", None))
        stops = tuple(dict.fromkeys((*eos, *special_ids(tokenizer, "<eos>", "<turn|>"))))
        return cls(module, tokenizer, config=config, path=folder, source=source, mask_token_id=None,
                   stop_token_ids=stops, context_length=text.max_position_embeddings, hidden_size=text.hidden_size,
                   num_layers=text.num_hidden_layers, vocab_size=text.vocab_size)

    @property
    def canvas_length(self) -> int:
        return self.module.config.canvas_length

    @property
    def pad_token_id(self) -> int:
        pad = self.module.config.text_config.pad_token_id
        return pad if pad is not None else (self.tokenizer.pad_token_id or 0)

    # --- running -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser logits (B, T, V) for the canvas `input_ids`, given `prompt_ids` (B, P); default <bos> alone.

        The prompt goes through the causal encoder into a fresh KV cache, which the decoder reads with no
        self-conditioning signal, as at a canvas's first step. `attention_mask` (B, T) marks real canvas tokens.
        """
        ids = input_ids.to(self.device)
        if prompt_ids is None:
            bos = self.module.config.text_config.bos_token_id
            prompt_ids = torch.full((ids.shape[0], 1), bos if bos is not None else self.pad_token_id)
        prompt_ids = prompt_ids.to(self.device)
        mask = None
        if attention_mask is not None:  # the decoder's mask spans prompt + canvas
            mask = torch.cat([torch.ones_like(prompt_ids, dtype=torch.bool), attention_mask.to(self.device).bool()], 1)
        return self.module(input_ids=prompt_ids, decoder_input_ids=ids, decoder_attention_mask=mask).logits

    def denoise(self, prompt_ids: list[int], config: GenerationConfig,
                cancel: CancelToken | None = None) -> Generator[Event, None, GenerationResult]:
        """Generate with the model's own sampler, yielding a `DenoiseStep` per denoising step.

        How `config` maps onto generate():
        - gen_length -> max_new_tokens. Whole canvases are generated; the answer is cut to gen_length (or
          padded, after an early EOS).
        - steps is the budget for the whole answer, split evenly over its canvases (max_denoising_steps).
        - temperature 0 keeps the checkpoint's temperature schedule (the sampler always samples);
          T > 0 anneals from T to T/2 over a canvas's steps.
        - seed seeds the global RNG, which generate draws from; forbid_eos bans the stop tokens.
        - block_length, remasking and defer_eos do not apply: canvas and acceptance rule are the model's.
        """
        from dllm_studio.sampling import GenerationResult, GenerationStats

        self._check(prompt_ids, config)
        start = time.perf_counter()
        canvases = math.ceil(config.gen_length / self.canvas_length)
        steps_per_canvas = math.ceil(config.steps / canvases)
        events: queue.Queue = queue.Queue()  # unbounded: the worker never blocks on a slow consumer
        stop = threading.Event()
        probe = _Probe(list(self.stop_token_ids) if config.forbid_eos else [])
        streamer = _DraftStreamer(events.put, lambda: stop.is_set() or (cancel is not None and cancel.cancelled),
                                  probe, config.gen_length, canvases * steps_per_canvas, self.pad_token_id)
        worker = threading.Thread(target=self._generate, name="diffusion-gemma-generate", daemon=True,
                                  args=(prompt_ids, config, steps_per_canvas, streamer, probe, events))
        worker.start()
        history: list[DenoiseStep] = []
        try:
            while True:
                kind, payload = events.get()
                if kind == "step":
                    history.append(payload)
                    yield payload
                    if cancel is not None:
                        cancel.check()
                elif kind == "done":  # whole canvases, or fewer if EOS came early: cut or pad to gen_length
                    answer = (payload + [self.pad_token_id] * config.gen_length)[: config.gen_length]
                    break
                elif kind == "stopped":
                    raise Cancelled("Cancelled by the user.")
                else:
                    raise payload
        finally:
            stop.set()  # ends generate at its next step if we leave early (cancelled, error, generator closed)
            worker.join()

        wall = time.perf_counter() - start
        # forward_passes counts decoder passes (one per step), as transformers' tokens_per_forward does.
        stats = GenerationStats(steps=len(history), forward_passes=len(history), wall_time_s=wall,
                                forward_time_s=wall, answer_tokens=self.answer_length(answer),
                                dtype=str(self.dtype).removeprefix("torch."))
        return GenerationResult(self.decode(answer), answer, list(prompt_ids), stats, history)

    def _generate(self, prompt_ids: list[int], config: GenerationConfig, steps_per_canvas: int,
                  streamer: _DraftStreamer, probe: _Probe, events: queue.Queue) -> None:
        """Worker thread: run generate and report how it ended on `events`."""
        from transformers.generation import LogitsProcessorList
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

        schedule = {"t_max": config.temperature, "t_min": config.temperature / 2} if config.temperature > 0 else {}
        generation_config = DiffusionGemmaGenerationConfig(
            max_new_tokens=config.gen_length, max_length=len(prompt_ids) + config.gen_length,
            max_denoising_steps=steps_per_canvas, eos_token_id=list(self.stop_token_ids),
            pad_token_id=self.pad_token_id, disable_compile=True if self.device.type == "cpu" else None, **schedule)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # generate draws from the global RNG; restored after
                torch.manual_seed(config.seed)
                out = self.module.generate(torch.tensor([prompt_ids], device=self.device), streamer=streamer,
                                           generation_config=generation_config,
                                           logits_processor=LogitsProcessorList([probe]))
            events.put(("done", out.sequences[0, len(prompt_ids):].tolist()))
        except _Stop:
            events.put(("stopped", None))
        except BaseException as exc:  # re-raised by `denoise` in the caller's thread
            events.put(("error", exc))

    def _check(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        if not prompt_ids:
            raise InvalidSettingsError("The prompt is empty.")
        self.check_settings(config)
        if len(prompt_ids) + config.gen_length > self.context_length:
            raise InvalidSettingsError(
                f"The prompt ({len(prompt_ids)} tokens) plus gen_length {config.gen_length} exceeds the model's "
                f"context of {self.context_length} tokens.")

    def check_settings(self, config: GenerationConfig) -> None:
        # Only the settings its own sampler reads are checked (block_length and remasking do not apply).
        if config.gen_length < 1 or config.steps < 1:
            raise InvalidSettingsError("gen_length and steps must both be at least 1.")
        if config.temperature < 0:
            raise InvalidSettingsError("temperature must not be negative.")
        if config.cfg_scale > 0:
            raise InvalidSettingsError("DiffusionGemma has no classifier-free guidance; set cfg_scale to 0.")
        if config.cache != "none" or config.parallel:
            raise InvalidSettingsError("DiffusionGemma generates with its own sampler and acceptance rule; "
                                       "--cache, --threshold and --factor do not apply to it.")

    # --- structure ---------------------------------------------------------------------------
    def linear_layers(self) -> list[LinearLayer]:
        # The encoder's layers are the decoder's (shared weights), and the vision tower and the decoder's
        # self-conditioning MLP are no per-layer linears: keep the decoder layers and the LM head.
        return [layer for layer in super().linear_layers()
                if layer.role == "head" or layer.name.startswith("model.decoder.layers.")]


class _Stop(Exception):
    """Raised from the streamer inside generate() to end it between denoising steps."""


class _Probe:
    """A logits processor that sees each step's raw canvas logits (1, C, V) before sampling.

    It keeps the top probability per position (the draft token's, since the draft is the argmax) and,
    for forbid_eos, sets the banned tokens' logits to -inf.
    """

    def __init__(self, banned: list[int]) -> None:
        self.banned = banned
        self.top: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.banned:
            scores = scores.index_fill(-1, torch.tensor(self.banned, device=scores.device), -torch.inf)
        self.top = scores[0].float().softmax(-1).amax(-1).tolist()
        return scores


class _DraftStreamer:
    """Turns generate()'s streamer calls into DenoiseStep events, and stops generate when asked.

    A draft position counts as settled when its token is the same as at the previous step (the model's own
    stability test); `committed` holds the positions that settled in this step, `masked` those still
    changing plus the canvases not started yet (shown as pad tokens).
    """

    def __init__(self, emit, should_stop, probe: _Probe, gen_length: int, total_steps: int, pad_id: int) -> None:
        self.emit, self.should_stop, self.probe = emit, should_stop, probe
        self.gen_length, self.total_steps, self.pad_id = gen_length, total_steps, pad_id
        self.done: list[int] = []  # tokens of finished canvases
        self.previous: list[int] | None = None  # the current canvas's last draft
        self.settled: set[int] = set()
        self.seen_prompt = False
        self.step = 0

    def put(self, value: torch.Tensor) -> None:
        if self.should_stop():
            raise _Stop
        if self.seen_prompt:  # a finished canvas
            self.done += value[0].tolist()
            self.previous, self.settled = None, set()
        self.seen_prompt = True  # the first put is the prompt

    def put_draft(self, value: torch.Tensor) -> None:
        if self.should_stop():
            raise _Stop
        draft, offset = value[0].tolist(), len(self.done)
        previous = self.previous or [None] * len(draft)
        settled = {i for i, (a, b) in enumerate(zip(draft, previous)) if a == b and offset + i < self.gen_length}
        top = self.probe.top or [1.0] * len(draft)
        committed = tuple(Commit(offset + i, draft[i], top[i]) for i in sorted(settled - self.settled))
        tokens = (self.done + draft + [self.pad_id] * self.gen_length)[: self.gen_length]
        masked = tuple(p for p in range(offset, self.gen_length) if p - offset not in settled)
        self.previous, self.settled = draft, settled
        self.step += 1
        self.emit(("step", DenoiseStep(step=self.step, total_steps=self.total_steps, block=offset // len(draft),
                                       tokens=tuple(tokens), committed=committed, masked=masked)))

    def end(self) -> None:
        pass
