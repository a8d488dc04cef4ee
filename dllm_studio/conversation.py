"""The chat conversation file: two panes of turns, the sampler that produced them, and every denoising step.

A conversation is JSON: `{"version", "model", "variant", "sampler", "panes": {"fp": [...], "quant": [...]}}`,
each turn keeping its frames so that a reopened conversation replays step by step. Files from older
versions open: keys added later are optional and read with the defaults they had before they existed.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_type_hints

from dllm_studio.errors import ConversationError
from dllm_studio.events import Commit, DenoiseStep
from dllm_studio.files import atomic_write_text
from dllm_studio.sampling import GenerationConfig

FORMAT_VERSION = 2  # 2: stats named answer_tokens / answer_tokens_per_s (1 said tokens / tokens_per_s)
PANES = ("fp", "quant")  # full precision, quantized variant
# The GenerationConfig fields a conversation records: the ones the chat panel offers.
SAMPLER_FIELDS = ("gen_length", "steps", "block_length", "remasking", "temperature", "seed", "cache", "threshold")
LATER_SAMPLER = ("cache", "threshold")  # absent from files saved before they existed: GenerationConfig's defaults
_FIELD_TYPES = get_type_hints(GenerationConfig)  # field -> type (e.g. float | None), to coerce saved values
STATS = {"steps": int, "forward_passes": int, "wall_time_s": float, "ms_per_step": float, "answer_tokens": int,
         "answer_tokens_per_s": float, "peak_rss_bytes": int}
LATER_STATS = {"kernels": dict, "weight_bytes": int, "forward_equivalents": float, "tokens_per_step": float,
               "cache_refreshes": int, "cache_bytes": int}  # absent from files saved before they existed
OLD_STATS = {"answer_tokens": "tokens", "answer_tokens_per_s": "tokens_per_s"}  # format 1's names, same meaning


@dataclass
class Turn:
    """One prompt and one pane's answer to it, with every denoising step kept for replay."""

    prompt: str
    total_steps: int
    gen_length: int
    mask_id: int | None
    variant: str | None = None  # the quantized pane's model, by name
    state: str = "queued"  # queued | running | done | stopped | failed | skipped
    message: str = ""  # why it failed or was skipped
    frames: list[DenoiseStep] = field(default_factory=list)
    pieces: dict[int, str] = field(default_factory=dict)  # token id -> its text, for every id in the frames
    token_ids: list[int] = field(default_factory=list)  # the final answer span, stop tokens included
    answer: str | None = None  # the decoded answer, once done
    length: int = 0  # generated tokens before the first stop token
    stats: dict | None = None
    prompt_ids: list[int] = field(default_factory=list)
    adaptive: bool = False  # parallel decoding: total_steps is a ceiling, the answer may take fewer

    def note(self) -> str:
        return f"Failed: {self.message}" if self.state == "failed" else f"Not run: {self.message}"

    def step_of(self, step: int) -> str:
        """"3 of 16": of the steps taken once done (parallel decoding may finish early), else of those it may take."""
        if self.state == "done":
            return f"{step} of {len(self.frames)}"
        return f"{step} of {'at most ' * self.adaptive}{self.total_steps}"

    def to_dict(self) -> dict:
        used = sorted({t for f in self.frames for t in f.tokens})
        return {"prompt": self.prompt, "variant": self.variant, "state": self.state, "message": self.message,
                "answer": self.answer, "token_ids": self.token_ids, "length": self.length, "stats": self.stats,
                "total_steps": self.total_steps, "adaptive": self.adaptive, "gen_length": self.gen_length,
                "mask_token_id": self.mask_id, "pieces": {str(t): self.pieces.get(t, "") for t in used},
                "steps": [{"block": f.block, "tokens": list(f.tokens), "refreshed": f.refreshed,
                           "committed": [[c.position, round(c.confidence, 4)] for c in f.committed]}
                          for f in self.frames]}

    @classmethod
    def from_dict(cls, d: dict) -> Turn:
        if d["state"] not in ("done", "stopped", "failed", "skipped"):
            raise ValueError(f"a turn's state is {d['state']!r}")
        turn = cls(str(d["prompt"]), int(d["total_steps"]), int(d["gen_length"]), d["mask_token_id"],
                   d.get("variant"), d["state"], str(d.get("message", "")), adaptive=bool(d.get("adaptive", False)))
        for i, s in enumerate(d["steps"]):  # "adaptive" and "refreshed" are absent from files saved before them
            tokens = tuple(int(t) for t in s["tokens"])
            committed = tuple(Commit(int(p), tokens[int(p)], float(c)) for p, c in s["committed"])
            masked = tuple(j for j, t in enumerate(tokens) if t == turn.mask_id)
            turn.frames.append(DenoiseStep(i + 1, turn.total_steps, int(s["block"]), tokens, committed, masked,
                                           bool(s.get("refreshed", False))))
        turn.pieces = {int(k): str(v) for k, v in d["pieces"].items()}
        turn.token_ids = [int(t) for t in d["token_ids"]]
        turn.answer = None if d["answer"] is None else str(d["answer"])
        turn.length = int(d["length"])
        if not 0 <= turn.length <= len(turn.token_ids):
            raise ValueError(f"an answer of {len(turn.token_ids)} tokens cannot have {turn.length} before its end")
        stats = d["stats"]
        turn.stats = None if stats is None else {
            **{k: kind(stats[k] if k in stats else stats[OLD_STATS[k]]) for k, kind in STATS.items()},
            **{k: kind(stats[k]) for k, kind in LATER_STATS.items() if k in stats}}
        return turn


@dataclass
class Conversation:
    """Both panes' turns and the settings they ran with."""

    model: str | None = None  # the full-precision model's source
    variant: str | None = None  # the quantized variant chosen, by name
    sampler: dict = field(default_factory=dict)  # SAMPLER_FIELDS -> GenerationConfig values (threshold None = off)
    panes: dict[str, list[Turn]] = field(default_factory=lambda: {key: [] for key in PANES})


def save_conversation(path: str | Path, conversation: Conversation) -> None:
    """Write `conversation` as JSON, all or nothing; an OS failure is a `WriteError` naming `path`."""
    data = {"version": FORMAT_VERSION, "model": conversation.model, "variant": conversation.variant,
            "sampler": conversation.sampler,
            "panes": {key: [turn.to_dict() for turn in turns] for key, turns in conversation.panes.items()}}
    atomic_write_text(path, json.dumps(data, ensure_ascii=False))


def load_conversation(path: str | Path) -> Conversation:
    """Read a conversation saved by this or an older dLLM Studio; anything else is a `ConversationError`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data["version"] > FORMAT_VERSION:
            raise ValueError(f"it was written by a newer dLLM Studio (format {data['version']})")
        panes = {key: [Turn.from_dict(t) for t in data["panes"][key]] for key in PANES}
        sampler = _sampler(data["sampler"])
    except OSError as exc:
        raise ConversationError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        # Any malformed part reads as one sentence naming the file; the exception says which part.
        raise ConversationError(f"{path} is not a dLLM Studio conversation ({type(exc).__name__}: {exc}).") from None
    return Conversation(data.get("model"), data.get("variant"), sampler, panes)


def _sampler(saved: dict) -> dict:
    """The saved sampler values as GenerationConfig takes them (each coerced to its field's type), with the
    defaults for fields older files lack. Not validated: settings that cannot run are the panel's to flag."""
    saved = {**{name: getattr(GenerationConfig(), name) for name in LATER_SAMPLER}, **saved}
    config = GenerationConfig(**{name: _coerce(_FIELD_TYPES[name], saved[name]) for name in SAMPLER_FIELDS})
    return {name: getattr(config, name) for name in SAMPLER_FIELDS}


def _coerce(kind, value):
    if isinstance(kind, types.UnionType):  # an optional field, e.g. float | None
        if value is None:
            return None
        kind = next(k for k in get_args(kind) if k is not type(None))
    return kind(value)
