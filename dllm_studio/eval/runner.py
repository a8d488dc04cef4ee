"""The evaluation job: answer every item of a suite, score it, and summarise accuracy and cost.

`evaluate` is an event-stream job like the sampler: it yields an `EvalProgress` per item and returns
an `EvalResult`. QA, math and code items are answered with the model's own sampler (`model.denoise`)
from a chat prompt; text items are scored by their masked-diffusion likelihood (`masked_nll`), the
diffusion counterpart of perplexity. Nothing here depends on a particular model family.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dllm_studio import jobs
from dllm_studio.errors import InvalidSettingsError
from dllm_studio.eval.scoring import final_number, normalize, require_sandbox, score_code, score_math, score_qa
from dllm_studio.eval.suites import Suite, load_suite
from dllm_studio.events import CancelToken, EvalProgress
from dllm_studio.flips import compact
from dllm_studio.memory import peak_rss_bytes
from dllm_studio.quant import kernels
from dllm_studio.sampling import GenerationConfig, shift_right

if TYPE_CHECKING:
    from dllm_studio.models.base import DiffusionLM

# Short answers for QA and math, room for a function for code; one token committed per step, one block.
SUITE_DEFAULTS: dict[str, GenerationConfig] = {
    "qa": GenerationConfig(gen_length=16, steps=16, block_length=16),
    "math": GenerationConfig(gen_length=16, steps=16, block_length=16),
    "code": GenerationConfig(gen_length=32, steps=32, block_length=32),
}
KEPT_STEPS = ("prompt_ids", "trajectory")  # ItemRecord fields `keep_steps` fills, left out of `to_dict`
NLL_SAMPLES = 8  # mask ratios per sentence for the text suite's likelihood estimate


@dataclass
class ItemRecord:
    id: str
    prompt: str  # the text item's sentence for the text suite
    expected: str
    generated: str  # empty for the text suite
    correct: bool | None  # None for the text suite
    reason: str
    nll_per_token: float | None = None  # text suite only
    steps: int = 0
    forward_passes: int = 0
    forward_equivalents: float = 0.0  # forward passes in whole sequences (a cached window counts its share)
    committed_tokens: int = 0
    wall_time_s: float = 0.0  # generating (or scoring) this item, code tests excluded
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # kept with the steps (`evaluate(keep_steps)`)
    trajectory: list = field(default_factory=list, repr=False)  # its denoising steps' commits (`flips.Step`), when kept


@dataclass
class SkippedItem:
    id: str
    reason: str  # e.g. "prompt of 300 tokens + gen_length 32 exceeds context 256"


@dataclass
class EvalResult:
    suite: str
    path: str
    items: int
    accuracy: float | None  # qa, math, code
    nll_per_token: float | None  # text: mean over sentences, lower is better
    ms_per_step: float | None  # mean denoising step time; None for text
    forward_passes_per_item: float
    wall_time_per_item_s: float
    peak_rss_bytes: int  # this process's peak resident memory so far (code-test processes not included)
    wall_time_s: float
    settings: dict | None  # the GenerationConfig used; for text only the seed matters
    records: list[ItemRecord] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)  # not answered; `items` counts the rest
    kernels: dict[str, int] = field(default_factory=dict)  # how the quantized layers ran (`kernels.ran`)
    # What a KV cache and parallel decoding save (`GenerationStats`); equal to passes and 1 token without them.
    forward_equivalents_per_item: float = 0.0
    tokens_per_step: float | None = None  # None for text

    def to_dict(self) -> dict:
        """Plain data; the trajectories `keep_steps` kept stay out (they are the flips' input, not a result)."""
        data = dataclasses.asdict(dataclasses.replace(self, records=[]))
        data["records"] = [{k: v for k, v in dataclasses.asdict(dataclasses.replace(r, trajectory=[], prompt_ids=[])).items()
                            if k not in KEPT_STEPS} for r in self.records]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """The result `to_dict` made (as a study's cache reads it back)."""
        records = [ItemRecord(**r) for r in data["records"]]
        skipped = [SkippedItem(**s) for s in data.get("skipped", [])]
        return cls(**{**data, "records": records, "skipped": skipped})


def suite_config(suite: str, overrides: dict | None = None) -> GenerationConfig:
    """`SUITE_DEFAULTS[suite]` with `overrides` (GenerationConfig field -> value) applied and validated.

    An overridden gen_length carries steps and block_length along unless those are given too, so the
    defaults' shape (one block, one token per step) holds at any length.
    """
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    for key in overrides:
        if key not in known:
            raise InvalidSettingsError(f"Unknown generation setting {key!r}; known: {', '.join(sorted(known))}.")
    if "gen_length" in overrides:
        overrides.setdefault("steps", overrides["gen_length"])
        overrides.setdefault("block_length", overrides["gen_length"])
    config = dataclasses.replace(SUITE_DEFAULTS.get(suite, GenerationConfig()), **overrides)
    config.validate()
    return config


def unisolated_code(suites: list[Suite | str | Path]) -> str | None:
    """Why the generated code of these suites could not run isolated here, or None (no code suite among
    them, or an OS sandbox exists): what a face asks the user about before passing `unsafe_code_eval`."""
    if not any((s if isinstance(s, Suite) else load_suite(s)).name == "code" for s in suites):
        return None
    from dllm_studio.eval import sandbox

    return sandbox.unavailable()


def evaluate(model: DiffusionLM, suite: Suite | str | Path, config_overrides: dict | None = None,
             limit: int | None = None, cancel: CancelToken | None = None, unsafe_code_eval: bool = False,
             keep_steps: bool = False) -> Generator[EvalProgress, None, EvalResult]:
    """Answer and score the first `limit` items of `suite` (all by default), one `EvalProgress` each.

    With `keep_steps` every answer's record keeps its prompt ids and denoising steps (for `flips`).

    A code suite is refused before any answer is generated where no OS sandbox can isolate the code,
    unless `unsafe_code_eval` (see `scoring.require_sandbox`)."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    if suite.name == "code":
        require_sandbox(unsafe_code_eval)
    if limit is not None and limit < 1:
        raise InvalidSettingsError(f"limit must be at least 1, not {limit}.")
    config = suite_config(suite.name, config_overrides)
    start = time.perf_counter()
    items, skipped = _fitting(model, suite, suite.items[:limit], config)
    if not items:
        raise InvalidSettingsError(f"No item of {suite.path} fits the model's context: {skipped[0].reason} "
                                   f"(item {skipped[0].id}), and so on for all {len(skipped)}.")
    records: list[ItemRecord] = []
    for item, prompt_ids in items:
        if cancel is not None:
            cancel.check()
        if suite.name == "text":
            records.append(_text_item(model, item, config.seed + len(records)))
        else:
            records.append(_answer_item(model, suite.name, item, prompt_ids, config, cancel, unsafe_code_eval,
                                        keep_steps))
        yield _progress(suite.name, records, len(items))
    result = _summary(suite, records, config, time.perf_counter() - start)
    result.skipped = skipped
    result.kernels = kernels.ran(model.module)
    return result


def _fitting(model: DiffusionLM, suite: Suite, items: tuple[dict, ...], config: GenerationConfig
             ) -> tuple[list[tuple[dict, list[int] | None]], list[SkippedItem]]:
    """The items whose prompt and answer fit the model's context, with their prompt ids, and the rest.

    One over-long item should not cost the whole run, so it is set aside with the reason. Text items always
    fit: their likelihood is scored on as much of the sentence as the context holds.
    """
    if suite.name == "text":
        return [(item, None) for item in items], []
    fitting, skipped = [], []
    for item in items:
        prompt_ids = model.chat_ids([{"role": "user", "content": item["prompt"]}])
        if len(prompt_ids) + config.gen_length > model.context_length:
            skipped.append(SkippedItem(item["id"], f"prompt of {len(prompt_ids)} tokens + gen_length "
                                                   f"{config.gen_length} exceeds context {model.context_length}"))
        else:
            fitting.append((item, prompt_ids))
    return fitting, skipped


# ---- answering --------------------------------------------------------------------------------------

def _answer_item(model: DiffusionLM, suite: str, item: dict, prompt_ids: list[int], config: GenerationConfig,
                 cancel: CancelToken | None, unsafe_code_eval: bool = False, keep_steps: bool = False) -> ItemRecord:
    result = jobs.run(model.denoise(prompt_ids, config, cancel))
    correct, reason = judge(suite, result.text, item, unsafe_code_eval)
    record = ItemRecord(item["id"], item["prompt"], item["answer"], result.text, correct, reason,
                        steps=result.stats.steps, forward_passes=result.stats.forward_passes, forward_equivalents=result.stats.forward_equivalents,
                        committed_tokens=result.stats.committed_tokens, wall_time_s=result.stats.wall_time_s)
    if keep_steps:
        record.prompt_ids, record.trajectory = list(prompt_ids), list(compact(result.steps))
    return record


def judge(suite: str, generated: str, item: dict, unsafe_code_eval: bool = False) -> tuple[bool, str]:
    """Whether `generated` answers `item` correctly, and a short reason."""
    if suite == "qa":
        if score_qa(generated, item["answer"]):
            return True, "exact match"
        return False, f"expected {normalize(item['answer'])!r}, got {normalize(generated)!r}"
    if suite == "math":
        found, expected = final_number(generated), final_number(item["answer"])
        if found is None:
            return False, "no number in the answer"
        return score_math(generated, item["answer"]), f"final number {found}, expected {expected}"
    if suite == "code":
        outcome = score_code(generated, item, unsafe_code_eval)
        return outcome.passed, outcome.reason
    raise InvalidSettingsError(f"Suite {suite!r} has no answers to judge.")


# ---- likelihood ---------------------------------------------------------------------------------------

def _text_item(model: DiffusionLM, item: dict, seed: int) -> ItemRecord:
    start = time.perf_counter()
    nll, passes = masked_nll(model, item["text"], seed=seed)
    reason = "too short to score" if nll is None else f"nll/token {nll:.4f}"
    return ItemRecord(item["id"], item["text"], item["text"], "", None, reason, nll_per_token=nll,
                      forward_passes=passes, forward_equivalents=passes, wall_time_s=time.perf_counter() - start)


@torch.inference_mode()
def masked_nll(model: DiffusionLM, text: str, samples: int = NLL_SAMPLES, seed: int = 0) -> tuple[float | None, int]:
    """Masked-diffusion negative log-likelihood per token of `text` (lower is better), and forward passes used.

    The negative ELBO of a masked diffusion LM (LLaDA, arXiv:2502.09992 eq. 3) is
    E_t[(1/t) * sum over masked tokens of -log p(token | partly masked text)], each token masked with
    probability t. Here t takes `samples` fixed values (k + 0.5) / samples, masks come from a seeded
    generator, and the estimate is divided by the number of tokens. The text is tokenised without
    a chat template; a BOS token, where the tokenizer has one, is unmasked context.
    Returns (None, 0) when the text has no token to score.
    """
    if model.mask_token_id is None:
        raise InvalidSettingsError(f"{model.family} models have no mask token, so the text suite cannot score them.")
    context, ids = _sentence_ids(model, text)
    if not ids:
        return None, 0
    ratios = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples  # (K,)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(samples, len(ids), generator=generator, dtype=torch.float64) < ratios[:, None]  # (K, N)
    used = masks.any(dim=1)  # a sample with no masked token contributes 0 and needs no forward pass
    x = torch.tensor(ids).repeat(samples, 1)
    x[masks] = model.mask_token_id
    x = torch.cat([torch.tensor(context, dtype=torch.long).repeat(samples, 1), x], dim=1)[used]  # (R, C + N)
    logits = model.forward(x).float()
    if model.shift_logits:
        logits = shift_right(logits)
    logits = logits[:, len(context):].cpu()  # (R, N, V)
    targets = torch.tensor(ids).repeat(int(used.sum()), 1)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()  # (R, N)
    weighted = (loss * masks[used]).sum(dim=1) / ratios[used]
    return float(weighted.sum() / samples / len(ids)), int(used.sum())


def _sentence_ids(model: DiffusionLM, text: str) -> tuple[list[int], list[int]]:
    """(context, scored) token ids: BOS as context where there is one, the sentence to score after it."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if bos is not None:
        context = [bos]
    elif model.shift_logits:
        # Shifted logits predict position i from position i - 1: the first token has nothing before it.
        context, ids = ids[:1], ids[1:]
    else:
        context = []
    return context, ids[: max(model.context_length - len(context), 0)]


# ---- bookkeeping ----------------------------------------------------------------------------------------

def _progress(suite: str, records: list[ItemRecord], total: int) -> EvalProgress:
    last = records[-1]
    if suite == "text":
        scored = [r.nll_per_token for r in records if r.nll_per_token is not None]
        return EvalProgress(suite, len(records), total, last.id, None, None, _mean(scored))
    return EvalProgress(suite, len(records), total, last.id, last.correct,
                        sum(bool(r.correct) for r in records) / len(records))


def _summary(suite: Suite, records: list[ItemRecord], config: GenerationConfig, wall_time_s: float) -> EvalResult:
    n = len(records)
    text = suite.name == "text"
    steps = sum(r.steps for r in records)
    generation_s = sum(r.wall_time_s for r in records)
    return EvalResult(
        suite=suite.name, path=str(suite.path), items=n,
        accuracy=None if text else sum(bool(r.correct) for r in records) / n,
        nll_per_token=_mean([r.nll_per_token for r in records if r.nll_per_token is not None]) if text else None,
        ms_per_step=None if text or not steps else 1000 * generation_s / steps,
        forward_passes_per_item=sum(r.forward_passes for r in records) / n,
        forward_equivalents_per_item=math.fsum(r.forward_equivalents for r in records) / n,
        tokens_per_step=None if text or not steps else sum(r.committed_tokens for r in records) / steps,
        wall_time_per_item_s=generation_s / n, peak_rss_bytes=peak_rss_bytes(), wall_time_s=wall_time_s,
        settings={"seed": config.seed} if text else dataclasses.asdict(config), records=records)


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None
