"""Calibration inputs: token windows from built-in or user text, masked as the model sees them while denoising.

A dLLM never sees clean text at inference: every step's input is partly masked. The seed study
calibrated on clean text; its follow-ups (DLLMQuant's TMAS, Quant-dLLM's MCS) mask the calibration
inputs at ratios spread over the denoising trajectory. Two ways to spread them (`QuantRecipe.calib_masking`):

- "stratified" (Quant-dLLM's MCS): sample n of N gets the mask ratio t = (k + u) / N for a shuffled k and
  u ~ U(0, 1), one ratio per stratum of (0, 1), and each token is masked with probability t.
- "timesteps" (DLLMQuant's TMAS, without its buckets): sample n is assigned one of the sampler's steps,
  stratified over the steps as above, and masked as the sampler's input looks before that step. The schedule
  is the sampler's own (`GenerationConfig`'s gen_length and block_length, `recipe.calib_steps` steps,
  `sampling.transfer_counts`): blocks before the step's block are unmasked, the step's block holds as many
  masks as the schedule leaves in it, later blocks are all masks. That layout is laid over the whole window,
  its blocks scaled to the window's length (equal when seq_len = gen_length), because a window is a slice of
  running text with no prompt in it, and a default window (256 tokens) is longer than the answer (64) while
  the demo's (32) is shorter: scaling keeps the schedule's masked fraction and its left-to-right order at
  every length. Which positions of the step's block are still masked depends on the model's confidences;
  here they are drawn at random.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from dllm_studio.errors import InvalidSettingsError, QuantizationError
from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.sampling import GenerationConfig, transfer_counts


# Per model: rendering thousands of chat turns costs seconds, and a study quantizes one base once per cell.
_BUILTIN_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def builtin_token_stream(model: DiffusionLM) -> list[int]:
    """The demo task training items as chat turns, then plain sentences, in the model's own tokenizer
    (tokenized once per model; callers must not change the list)."""
    if model not in _BUILTIN_STREAMS:
        _BUILTIN_STREAMS[model] = _tokenize_builtin(model)
    return _BUILTIN_STREAMS[model]


def _tokenize_builtin(model: DiffusionLM) -> list[int]:
    from dllm_studio.eval.suites import load_suite

    stop = list(model.stop_token_ids[:1])
    stream: list[int] = []
    for suite in ("qa", "math", "code"):
        for item in load_suite(suite, split="train").items:
            stream += model.chat_ids([{"role": "user", "content": item["prompt"]}])
            stream += model.tokenizer.encode(item["answer"], add_special_tokens=False) + stop
    for item in load_suite("text", split="train").items:
        stream += model.tokenizer.encode(item["text"], add_special_tokens=False) + stop
    return stream


def file_token_stream(model: DiffusionLM, path: Path) -> list[int]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantizationError(f"Calibration file {path} does not exist.") from None
    except UnicodeDecodeError:
        raise QuantizationError(f"Calibration file {path} is not UTF-8 text.") from None
    return model.tokenizer.encode(text, add_special_tokens=False)


def calibration_batch(model: DiffusionLM, recipe: QuantRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, masked): N windows of seq_len tokens and which positions hold the mask token (N, T) bool."""
    stream = builtin_token_stream(model) if recipe.calib == "builtin" else file_token_stream(model, Path(recipe.calib))
    n, length = recipe.calib_samples, recipe.seq_len
    if len(stream) < length:
        raise QuantizationError(f"The calibration text has {len(stream)} tokens; one sequence of {length} tokens "
                                "needs at least that many (use a longer file or a shorter sequence length).")
    if length > model.context_length:
        raise QuantizationError(f"A sequence length of {length} tokens exceeds the model's context of "
                                f"{model.context_length} tokens.")
    gen = torch.Generator().manual_seed(recipe.seed)
    tokens = torch.tensor(stream)
    starts = torch.randint(0, len(stream) - length + 1, (n,), generator=gen)
    ids = torch.stack([tokens[s:s + length] for s in starts.tolist()])
    masked = torch.zeros_like(ids, dtype=torch.bool)
    if recipe.masked_calib:
        if model.mask_token_id is None:
            raise QuantizationError(f"{model.family} has no mask token, so masked calibration cannot apply; "
                                    "turn masked calibration off to calibrate on clean text.")
        strata = (torch.randperm(n, generator=gen) + torch.rand(n, generator=gen)) / n
        if recipe.calib_masking == "timesteps":
            config = sampler_config(recipe)
            steps = (strata * config.steps).long().tolist()
            masked = torch.stack([timestep_mask(config, step, length, gen) for step in steps])
        else:
            masked = torch.rand(n, length, generator=gen) < strata[:, None]
        ids = torch.where(masked, model.mask_token_id, ids)
    return ids, masked


def sampler_config(recipe: QuantRecipe) -> GenerationConfig:
    """The sampler settings whose schedule "timesteps" masking follows: the default, at the recipe's step count."""
    config = GenerationConfig() if recipe.calib_steps is None else GenerationConfig(steps=recipe.calib_steps)
    try:
        config.validate()
    except InvalidSettingsError as exc:
        raise QuantizationError(f"Timestep masking cannot follow this schedule: {exc}") from None
    return config


def masks_before_step(config: GenerationConfig, step: int) -> list[int]:
    """How many of each block's positions are still masks before `step` (0-based, over the whole answer)."""
    per_block = config.steps // config.num_blocks
    block, done = divmod(step, per_block)
    left = config.block_length - sum(transfer_counts(config.block_length, per_block)[:done])
    return [0] * block + [left] + [config.block_length] * (config.num_blocks - block - 1)


def timestep_mask(config: GenerationConfig, step: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(length,) bool: the answer's masks before `step`, its blocks scaled onto `length` positions."""
    edges = [b * length // config.num_blocks for b in range(config.num_blocks + 1)]
    mask = torch.zeros(length, dtype=torch.bool)
    for lo, hi, left in zip(edges, edges[1:], masks_before_step(config, step)):
        # Rounded to the nearest count, so a window as long as the answer gets the sampler's counts exactly.
        count = (left * (hi - lo) * 2 + config.block_length) // (2 * config.block_length)
        mask[lo + torch.randperm(hi - lo, generator=gen)[:count]] = True
    return mask
