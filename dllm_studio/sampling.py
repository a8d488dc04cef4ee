"""The masked-diffusion sampler: LLaDA's reference algorithm, generalised, with Fast-dLLM's accelerations.

The answer starts as `gen_length` mask tokens after the prompt. It is split into blocks decoded left
to right (semi-autoregressive when block_length < gen_length); each block gets steps / num_blocks
steps. At every step the model predicts all masked positions at once, and the k most confident
predictions in the current block are committed for good, k following LLaDA's equal split.

Fast-dLLM (arXiv:2505.22618) adds two approximations, both off by default:
- a KV cache (`cache`): the block's first step runs the whole sequence and keeps every layer's keys and
  values; the block's other steps run only the block and the suffix after it ("prefix") or only the block
  ("dual") against those (`models.cache`);
- parallel decoding (`threshold` or `factor`): a step also commits every masked token of the block that is
  confident enough, so a block may finish in fewer steps than its share; `steps` becomes a ceiling.

Reference: ML-GSAI/LLaDA generate.py (`generate`, `get_num_transfer_tokens`, `add_gumbel_noise`);
Dream's `topk_margin`/`entropy` confidences; arXiv:2409.02908 for why Gumbel noise is float64;
NVlabs/Fast-dLLM `generate_with_prefix_cache`/`generate_with_dual_cache`, `get_transfer_index(_dynamic)`.

The model is called in exactly one place per step (`_step_logits`), which knows the current block and
decides what to recompute. Without a cache and a threshold the tokens are exactly LLaDA's.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from dllm_studio.errors import InvalidSettingsError
from dllm_studio.events import CancelToken, Commit, DenoiseStep, Event
from dllm_studio.models.cache import KVCache
from dllm_studio.quant import kernels

if TYPE_CHECKING:
    from dllm_studio.models.base import DiffusionLM

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHES = ("none", "prefix", "dual")
# Remasking scores a confidence threshold can be read against: a probability (low_confidence) or a difference
# of two (margin), both in [0, 1]. Random scores say nothing of the prediction; entropy scores are not in [0, 1].
THRESHOLD_SCORES = ("low_confidence", "margin")
EMPTY_PROMPT = "The prompt is empty."
_DEFERRED = 1e6  # subtracted from a deferred EOS's score: it is committed only after every other token


@dataclass
class GenerationConfig:
    gen_length: int = 64
    steps: int = 64
    block_length: int = 32
    remasking: str = "low_confidence"  # one of REMASKING
    temperature: float = 0.0  # 0 = greedy; otherwise Gumbel-max sampling at this temperature
    cfg_scale: float = 0.0  # classifier-free guidance; > 0 doubles the forward cost
    seed: int = 0
    forbid_eos: bool = False  # EOS logits set to -inf: the answer never ends early (LLaDA `logits_eos_inf`)
    defer_eos: bool = False  # EOS/EOT committed only after all other tokens (`confidence_eos_eot_inf`)
    cache: str = "none"  # one of CACHES: reuse keys/values within a block (Fast-dLLM); approximate
    threshold: float | None = None  # also commit every masked token of the block scoring >= threshold
    factor: float | None = None  # Fast-dLLM's factor rule: the n best while the n-th scores >= 1 - factor/(n+1)
    # Also refill the cache after a step that committed more than this many tokens (None: once per block, as
    # Fast-dLLM does). A parallel step that commits many tokens at once is where cached keys go stale.
    refresh_after: int | None = None

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def parallel(self) -> bool:
        """True when a step may commit more than its fixed share (a threshold or a factor is set)."""
        return self.threshold is not None or self.factor is not None

    def validate(self) -> None:
        if self.gen_length < 1 or self.block_length < 1 or self.steps < 1:
            raise InvalidSettingsError("gen_length, block_length and steps must all be at least 1.")
        if self.gen_length % self.block_length:
            raise InvalidSettingsError(
                f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}.")
        if self.steps % self.num_blocks:
            raise InvalidSettingsError(
                f"steps {self.steps} cannot be split evenly over {self.num_blocks} blocks "
                f"(gen_length {self.gen_length} / block_length {self.block_length}); use a multiple of {self.num_blocks}.")
        if self.remasking not in REMASKING:
            raise InvalidSettingsError(f"remasking must be one of {', '.join(REMASKING)}, not {self.remasking!r}.")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise InvalidSettingsError("temperature and cfg_scale must not be negative.")
        if self.cache not in CACHES:
            raise InvalidSettingsError(f"cache must be one of {', '.join(CACHES)}, not {self.cache!r}.")
        if self.threshold is not None and self.factor is not None:
            raise InvalidSettingsError("Give a confidence threshold or a factor, not both.")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise InvalidSettingsError(f"threshold must be in (0, 1], not {self.threshold}.")
        if self.factor is not None and self.factor <= 0:
            raise InvalidSettingsError(f"factor must be positive, not {self.factor}.")
        if self.refresh_after is not None and (self.refresh_after < 1 or self.cache == "none"):
            raise InvalidSettingsError("refresh_after needs a cache and must be at least 1 token.")
        if self.parallel and self.remasking not in THRESHOLD_SCORES:
            raise InvalidSettingsError(
                f"Parallel decoding compares confidences with a threshold, which {self.remasking} remasking has "
                f"no scale for; use {' or '.join(THRESHOLD_SCORES)}.")


@dataclass
class GenerationStats:
    steps: int = 0
    forward_passes: int = 0  # sequences evaluated by the model (2 per step with CFG), whole or a cached window
    # The same counted in whole sequences: a step over a 32-token window of a 320-token sequence counts 0.1.
    forward_equivalents: float = 0.0
    cache_refreshes: int = 0  # full forwards that refilled the KV cache (one per block with a cache)
    cache_bytes: int = 0  # the most the KV cache held
    committed_tokens: int = 0
    wall_time_s: float = 0.0
    forward_time_s: float = 0.0  # of wall_time_s, spent inside the model
    answer_tokens: int = 0  # tokens before the first stop token (`DiffusionLM.answer_length`), not gen_length
    kernels: dict[str, int] = field(default_factory=dict)  # quantized layers per kernel that ran them
    dtype: str = ""  # the floating-point dtype the model ran at (why: `DiffusionLM.dtype_reason`)

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.wall_time_s / max(self.steps, 1)

    @property
    def tokens_per_step(self) -> float:
        """Tokens committed per step: gen_length / steps with the fixed schedule, more with parallel decoding."""
        return self.committed_tokens / max(self.steps, 1)

    @property
    def answer_tokens_per_s(self) -> float:
        """Answer tokens (up to, not including, the first end-of-answer token) ÷ wall time.

        The padding after the answer is generated too, but counting it would make a short answer look fast;
        masked diffusion commits tokens in parallel, so this is not an autoregressive decode rate either.
        """
        return self.answer_tokens / self.wall_time_s if self.wall_time_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ms_per_step": self.ms_per_step, "tokens_per_step": self.tokens_per_step,
                "answer_tokens_per_s": self.answer_tokens_per_s}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the whole answer span, stop tokens included
    prompt_ids: list[int]
    stats: GenerationStats
    steps: list[DenoiseStep] = field(default_factory=list, repr=False)


# ---- pure functions -----------------------------------------------------------------------------

def transfer_counts(n_masked: int, steps: int) -> list[int]:
    """Tokens to commit per step: an equal split, the first n_masked % steps steps one extra."""
    base, extra = divmod(n_masked, steps)
    return [base + (i < extra) for i in range(steps)]


def parallel_count(scores: torch.Tensor, share: int, config: GenerationConfig) -> int:
    """How many of a block's masked positions a step commits: its fixed share, or more under parallel decoding.

    threshold: every position scoring >= threshold, at least one (Fast-dLLM's `get_transfer_index`).
    factor: the n best, for the largest n whose n-th best scores >= 1 - factor / (n + 1), at least one: more
    tokens at once only while each is surer (Fast-dLLM's `get_transfer_index_dynamic`).
    With steps = gen_length the share is one token, and these are Fast-dLLM's rules exactly.
    scores: (N,) of the block's masked positions.
    """
    if config.threshold is not None:
        confident = int((scores >= config.threshold).sum())
    elif config.factor is not None:
        ranked = scores.sort(descending=True).values
        n = torch.arange(1, len(ranked) + 1, device=ranked.device, dtype=ranked.dtype)
        confident = int((ranked >= 1 - config.factor / (n + 1)).cumprod(0).sum())  # the leading run that passes
    else:
        return min(share, len(scores))
    return min(max(share, confident, 1), len(scores))


def shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream's shift: position i takes the logits computed at i - 1; position 0 keeps its own."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max sampling in float64: argmax(logits - T·log(-log U)).

    This is LLaDA's `exp(logits) / (-log U)^T` taken in log space (same argmax, no overflow).
    logits: (N, V) float64 -> token ids (N,).
    """
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    return (logits - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)


def confidence(logits: torch.Tensor, tokens: torch.Tensor, strategy: str,
               generator: torch.Generator | None) -> torch.Tensor:
    """How sure the model is of each predicted position; higher is committed first.

    low_confidence: p(token); random: U(0,1); margin: p1 - p2; entropy: sum p log p (negative entropy).
    logits: (N, V) float64, tokens: (N,) -> (N,) float64.
    """
    if strategy == "random":
        return torch.rand(tokens.shape, generator=generator, dtype=torch.float64).to(logits.device)
    probs = torch.softmax(logits, dim=-1)
    if strategy == "low_confidence":
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if strategy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if strategy == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
    raise InvalidSettingsError(f"Unknown remasking strategy {strategy!r}.")


# ---- the sampler --------------------------------------------------------------------------------

def denoise(model: DiffusionLM, prompt_ids: list[int], config: GenerationConfig,
            cancel: CancelToken | None = None) -> Generator[Event, None, GenerationResult]:
    """Generate `config.gen_length` tokens after `prompt_ids`, yielding a `DenoiseStep` per step."""
    check_inputs(model, prompt_ids, config)
    start = time.perf_counter()
    mask_id, P = model.mask_token_id, len(prompt_ids)
    x = torch.tensor([prompt_ids + [mask_id] * config.gen_length], device=model.device)  # (1, P + G)
    generator = torch.Generator().manual_seed(config.seed)
    stats, history = GenerationStats(dtype=str(model.dtype).removeprefix("torch.")), []
    steps_per_block = config.steps // config.num_blocks
    cache = None if config.cache == "none" else KVCache()
    call_tokens: dict[int, int] = {}  # tokens per model call -> calls, for the kernels the stats report

    for block in range(config.num_blocks):
        lo, hi = P + block * config.block_length, P + (block + 1) * config.block_length
        counts = transfer_counts(int((x[0, lo:hi] == mask_id).sum()), steps_per_block)
        if cache is not None:
            cache.clear()  # the block's first forward refills it
        commits = []
        for share in counts:
            masked = (x[0, lo:hi] == mask_id).nonzero().squeeze(-1) + lo  # candidate positions
            if config.parallel and not len(masked):
                break  # parallel decoding finished the block early
            if cancel is not None:
                cancel.check()
            if cache is not None and config.refresh_after is not None and len(commits) > config.refresh_after:
                cache.clear()  # the last step changed too much of the block for its keys to be reused
            commits, refreshed = [], False
            if share or config.parallel:
                refreshed = cache is not None and cache.empty
                commits = choose_commits(model, x, lo, hi, share, config, generator, stats, cache, call_tokens)
                for c in commits:
                    x[0, P + c.position] = c.token_id
            stats.steps += 1
            stats.committed_tokens += len(commits)
            answer = x[0, P:].tolist()
            event = DenoiseStep(step=stats.steps, total_steps=config.steps, block=block, tokens=tuple(answer),
                                committed=tuple(commits), masked=tuple(i for i, t in enumerate(answer) if t == mask_id),
                                refreshed=refreshed)
            history.append(event)
            yield event

    stats.wall_time_s = time.perf_counter() - start
    answer = x[0, P:].tolist()
    stats.answer_tokens = model.answer_length(answer)
    stats.kernels = kernels.used(model.module, max(call_tokens, key=call_tokens.get, default=x.shape[1]))
    return GenerationResult(model.decode(answer), answer, list(prompt_ids), stats, history)


def choose_commits(model: DiffusionLM, x: torch.Tensor, lo: int, hi: int, share: int, config: GenerationConfig,
                   generator: torch.Generator, stats: GenerationStats, cache: KVCache | None = None,
                   call_tokens: dict[int, int] | None = None) -> list[Commit]:
    """What one step commits from the state `x` (1, P + G): the block [lo, hi)'s `share` most confident predictions
    at its masked positions (more under parallel decoding), most confident first. `x` is left as it is.

    The one definition of a step's decision: the sampler applies it, `flips.decision_flips` asks it of another
    model from the same state. Draws from `generator` only as the step needs (sampling, random remasking), so
    two models asked in the same order from the same states draw the same numbers.
    """
    t0 = time.perf_counter()
    P = x.shape[1] - config.gen_length
    masked = (x[0, lo:hi] == model.mask_token_id).nonzero().squeeze(-1) + lo
    logits = _step_logits(model, x, lo, hi, config, stats, cache, {} if call_tokens is None else call_tokens)
    logits = logits[masked - lo].double()
    stats.forward_time_s += time.perf_counter() - t0
    eos_ids = torch.tensor(model.stop_token_ids, device=logits.device, dtype=torch.long)
    if config.forbid_eos:
        logits[:, eos_ids] = -torch.inf
    tokens = sample_tokens(logits, config.temperature, generator)
    scores = confidence(logits, tokens, config.remasking, generator)
    if config.defer_eos:
        scores = scores - _DEFERRED * torch.isin(tokens, eos_ids)
    chosen = scores.topk(parallel_count(scores, share, config)).indices
    return [Commit(int(masked[i]) - P, int(tokens[i]), float(scores[i])) for i in chosen.tolist()]


def _step_logits(model: DiffusionLM, x: torch.Tensor, lo: int, hi: int, config: GenerationConfig,
                 stats: GenerationStats, cache: KVCache | None, call_tokens: dict[int, int]) -> torch.Tensor:
    """Logits (hi - lo, V) of the block [lo, hi), with CFG and Dream's shift applied.

    Without a cache: one forward over the whole sequence, as LLaDA's reference does at every step. With one,
    an empty cache is filled by a forward over the whole sequence; later steps run a window: the block
    (dual) or the block and everything after it (prefix; its cache keeps only what precedes the window).
    Dream predicts position i from position i - 1, so its window starts one position early.
    """
    rows, length = x, x.shape[1]
    if config.cfg_scale > 0:
        unconditional = x.clone()
        unconditional[:, :length - config.gen_length] = model.mask_token_id  # the prompt hidden: what guidance contrasts against
        rows = torch.cat([x, unconditional])
    shift = int(model.shift_logits)
    start, stop = lo - shift, (hi if config.cache == "dual" else length)  # a cached step's window
    tokens = length  # that this forward computes
    if cache is None:
        logits = model.forward(rows).float()
    elif cache.empty:
        logits = model.forward(rows, cache=cache, logits_for=slice(start, hi - shift)).float()
        if config.cache == "prefix":
            cache.truncate(start)
        stats.cache_refreshes += 1
        stats.cache_bytes = max(stats.cache_bytes, cache.nbytes)
    else:
        tokens = stop - start
        logits = model.forward(rows[:, start:stop], positions=torch.arange(start, stop), cache=cache,
                               logits_for=slice(0, hi - lo)).float()
    call_tokens[tokens] = call_tokens.get(tokens, 0) + 1
    stats.forward_passes += rows.shape[0]
    stats.forward_equivalents += rows.shape[0] * tokens / length
    if config.cfg_scale > 0:
        cond, uncond = logits.chunk(2)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
    if cache is None:
        logits = (shift_right(logits) if model.shift_logits else logits)[:, lo:hi]
    return logits[0]


def check_prompt(prompt: str) -> None:
    """Refuse a prompt of nothing but whitespace, before it is tokenized: there is nothing to answer."""
    if not prompt.strip():
        raise InvalidSettingsError(EMPTY_PROMPT)


def check_inputs(model: DiffusionLM, prompt_ids: list[int], config: GenerationConfig) -> None:
    if not prompt_ids:
        raise InvalidSettingsError(EMPTY_PROMPT)
    if model.mask_token_id is None:
        raise InvalidSettingsError(f"{model.family} models have no mask token; they generate with their own sampler.")
    model.check_settings(config)
    total = len(prompt_ids) + config.gen_length
    if total > model.context_length:
        raise InvalidSettingsError(
            f"The prompt ({len(prompt_ids)} tokens) plus gen_length {config.gen_length} exceeds the model's "
            f"context of {model.context_length} tokens.")
