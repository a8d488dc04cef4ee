"""Decision flips: where, step by step, a quantized model would decide differently than full precision.

Accuracy says *whether* an answer changed; this says *when* and *how*. The quantized model is teacher-forced on
the full-precision trajectory: before every step it is shown full precision's state (the same committed tokens,
the same masks) and asked what it would commit (`sampling.choose_commits`, the sampler's own decision). A step
flips when it would commit a different token, or at a different position. Separately, the two free-running
trajectories diverge at the first step after which their states differ; until the first flip they cannot.

The order in which end-of-text padding after the reference's answer is committed changes nothing a user reads, so
a stop token committed after the reference answer's end counts as neither a flip nor a divergence; ending the
answer elsewhere, or writing past its end, does.

Teacher-forced steps run without a KV cache (each state is given whole, so there is nothing to reuse): on a
cached full-precision run the flips include the cache's own approximation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dllm_studio.events import CancelToken, Commit, DenoiseStep
from dllm_studio.sampling import GenerationConfig, GenerationStats, check_inputs, choose_commits, transfer_counts

if TYPE_CHECKING:
    from dllm_studio.models.base import DiffusionLM


@dataclass(frozen=True)
class Padding:
    """Stop tokens after position `answer_end` (the reference answer's first stop token): the answer's padding."""

    answer_end: int
    stop_ids: frozenset[int]

    def holds(self, position: int, token_id: int) -> bool:
        return position > self.answer_end and token_id in self.stop_ids

    def normalized(self, tokens: tuple[int, ...], mask_id: int) -> tuple[int, ...]:
        """`tokens` with the padding and the masks after the answer's end made alike: their order is no difference."""
        return tuple(-1 if i > self.answer_end and (t == mask_id or t in self.stop_ids) else t
                     for i, t in enumerate(tokens))


@dataclass(frozen=True)
class StepDecision:
    """One step of the reference trajectory: what it committed and what the other model would have."""

    step: int
    block: int
    reference: tuple[Commit, ...]
    candidate: tuple[Commit, ...]
    padding: Padding | None = None  # what counts as padding after the reference's answer (None: nothing)

    def _counted(self, commits: tuple[Commit, ...]) -> list[Commit]:
        return [c for c in commits if self.padding is None or not self.padding.holds(c.position, c.token_id)]

    @property
    def other_positions(self) -> bool:
        return {c.position for c in self._counted(self.reference)} != {c.position for c in self._counted(self.candidate)}

    @property
    def other_tokens(self) -> bool:
        """A position both chose gets another token."""
        ours = {c.position: c.token_id for c in self._counted(self.candidate)}
        return any(ours.get(c.position, c.token_id) != c.token_id for c in self._counted(self.reference))

    @property
    def flipped(self) -> bool:
        return self.other_positions or self.other_tokens


@dataclass(frozen=True)
class DecisionFlips:
    steps: tuple[StepDecision, ...]
    first_divergence: int | None = None  # the first step whose free-running states differ; None: same answers

    @property
    def first_flip(self) -> int | None:
        return next((s.step for s in self.steps if s.flipped), None)

    @property
    def flipped_steps(self) -> int:
        return sum(s.flipped for s in self.steps)

    def to_dict(self) -> dict:
        """Plain data for reports: per step, both choices as [position, token] pairs and how they differ."""
        return {"first_flip": self.first_flip, "first_divergence": self.first_divergence,
                "flipped_steps": self.flipped_steps, "steps": len(self.steps),
                "decisions": [{"step": s.step, "block": s.block, "flipped": s.flipped,
                               "other_position": s.other_positions, "other_token": s.other_tokens,
                               "reference": [[c.position, c.token_id] for c in s.reference],
                               "candidate": [[c.position, c.token_id] for c in s.candidate]} for s in self.steps]}


@dataclass(frozen=True)
class Step:
    """What a kept trajectory holds of a `DenoiseStep`: its commits. The state after it is every commit so far
    over the masks (`states`), so a suite's trajectories cost their commits, not steps × answer length."""

    step: int
    block: int
    committed: tuple[Commit, ...]


def compact(steps: Sequence[DenoiseStep]) -> tuple[Step, ...]:
    return tuple(Step(s.step, s.block, s.committed) for s in steps)


def states(steps: Sequence[DenoiseStep | Step], gen_length: int, mask_id: int) -> list[tuple[int, ...]]:
    """The answer after each step: the masks with every commit so far (what `DenoiseStep.tokens` holds)."""
    state, out = [mask_id] * gen_length, []
    for step in steps:
        for c in step.committed:
            state[c.position] = c.token_id
        out.append(tuple(state))
    return out


def first_divergence(reference: Sequence[tuple[int, ...]], other: Sequence[tuple[int, ...]],
                     padding: Padding | None = None, mask_id: int = -1) -> int | None:
    """The first step (1-based) after which two trajectories' states differ (one ending sooner counts), or None;
    with `padding`, the order of the padding after the reference answer's end is no difference."""
    def state(tokens: tuple[int, ...]) -> tuple[int, ...]:
        return tokens if padding is None else padding.normalized(tokens, mask_id)

    for n, (a, b) in enumerate(zip(reference, other), 1):
        if state(a) != state(b):
            return n
    if len(reference) != len(other) and reference and other:
        return min(len(reference), len(other)) + 1
    return None


@torch.inference_mode()
def decision_flips(model: DiffusionLM, prompt_ids: list[int], config: GenerationConfig,
                   reference: Sequence[DenoiseStep | Step], other: Sequence[DenoiseStep | Step] | None = None,
                   cancel: CancelToken | None = None) -> DecisionFlips:
    """Teacher-force `model` on `reference` (the `DenoiseStep`s another model's `denoise` yielded for the same
    prompt and `config`, or their `compact` form) and compare its decision with the reference's at every step.

    `other`, the model's own free-running steps, gives the first divergence. Costs one forward per step.
    """
    config = dataclasses.replace(config, cache="none", refresh_after=None)
    check_inputs(model, prompt_ids, config)
    P, mask_id = len(prompt_ids), model.mask_token_id
    after = states(reference, config.gen_length, mask_id)  # after[i]: the state step i + 1 left
    padding = Padding(model.answer_length(after[-1]), frozenset(model.stop_token_ids)) if reference else None
    state = [mask_id] * config.gen_length
    generator = torch.Generator().manual_seed(config.seed)  # drawn from in the reference's order, step by step
    stats, per_block = GenerationStats(), config.steps // config.num_blocks
    decisions, block, counts = [], None, []
    for ref in reference:
        if cancel is not None:
            cancel.check()
        lo, hi = P + ref.block * config.block_length, P + (ref.block + 1) * config.block_length
        if ref.block != block:  # the block's schedule, as the sampler split it at the block's first step
            block = ref.block
            counts = iter(transfer_counts(sum(t == mask_id for t in state[lo - P:hi - P]), per_block))
        share = next(counts, 0)
        candidate = []
        if share or config.parallel:
            x = torch.tensor([prompt_ids + state], device=model.device)
            candidate = choose_commits(model, x, lo, hi, share, config, generator, stats)
        decisions.append(StepDecision(ref.step, ref.block, ref.committed, tuple(candidate), padding))
        state = list(after[len(decisions) - 1])
    if other is None:
        return DecisionFlips(tuple(decisions))
    return DecisionFlips(tuple(decisions), first_divergence(after, states(other, config.gen_length, mask_id),
                                                            padding, mask_id))
