"""Calibration inputs: token windows from built-in or user text, masked as the model sees them while denoising.

A dLLM never sees clean text at inference: every step's input is partly masked. The seed study
calibrated on clean text; its follow-ups (DLLMQuant's TMAS, Quant-dLLM's MCS) mask the calibration
inputs at ratios spread over the denoising trajectory. Here sample n of N gets the mask ratio
t = (k + u) / N for a shuffled k and u ~ U(0, 1): one ratio per stratum of (0, 1).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from dllm_studio.errors import QuantizationError
from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant.recipe import QuantRecipe


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
        ratios = (torch.randperm(n, generator=gen) + torch.rand(n, generator=gen)) / n
        masked = torch.rand(n, length, generator=gen) < ratios[:, None]
        ids = torch.where(masked, model.mask_token_id, ids)
    return ids, masked
