"""Typed events that long engine jobs emit, and the token that cancels them.

Only plain, JSON-serialisable data crosses this seam (no tensors, no Qt types): the CLI prints the
events, the GUI draws them from worker threads, tests assert on them.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from dllm_studio.errors import Cancelled


@dataclass(frozen=True)
class Event:
    def to_dict(self) -> dict:
        return {"event": type(self).__name__, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class DownloadProgress(Event):
    """Bytes of a hub download received so far (all files of the repository together)."""

    repo_id: str
    downloaded: int
    total: int | None


@dataclass(frozen=True)
class LoadProgress(Event):
    """A stage of loading a model: `stage` is a short human-readable phrase."""

    stage: str
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class LoadWarning(Event):
    """Something wrong with a model that still loaded (e.g. NaN weights): `message` is one sentence."""

    message: str
    tensors: tuple[str, ...] = ()  # the tensors it concerns, by name


@dataclass(frozen=True)
class ExportProgress(Event):
    """A step of writing a quantized folder: `stage` ("tensors", "files") with `done` of `total` finished."""

    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Commit:
    """One position of the answer revealed in a denoising step."""

    position: int  # index into the answer span (0 = first generated token)
    token_id: int
    confidence: float  # the remasking score that chose it (probability for low_confidence)


@dataclass(frozen=True)
class DenoiseStep(Event):
    """The state of the answer after one denoising step.

    Positions index the answer span, which starts right after the prompt. `tokens` holds every
    answer token id, with the mask id (or, for models without masks, the current draft) where
    nothing is committed yet. A step commits `len(committed)` tokens: its fixed share, or with parallel
    decoding every confident one, so several may appear at once and the last step may come before
    `total_steps`, which is then a ceiling.
    """

    step: int  # 1-based, over the whole generation
    total_steps: int
    block: int  # 0-based semi-autoregressive block
    tokens: tuple[int, ...]
    committed: tuple[Commit, ...]
    masked: tuple[int, ...]
    refreshed: bool = False  # this step's forward ran the whole sequence and refilled the KV cache


class CancelToken:
    """Cooperative cancellation: jobs call `check()` at least every second or so of work (between layers or steps,
    and inside the quantizers' searches and solvers), so a Cancel takes effect at once."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("Cancelled by the user.")


@dataclass(frozen=True)
class EvalProgress(Event):
    """One task item scored: the running totals of a suite's evaluation."""

    suite: str
    done: int  # items finished so far, this one included
    total: int
    item_id: str
    correct: bool | None  # None for the text suite, which scores likelihood, not answers
    accuracy: float | None  # running share correct; None for the text suite
    nll_per_token: float | None = None  # running mean over sentences; text suite only


@dataclass(frozen=True)
class MemorySample(Event):
    """Process memory, sampled several times a second by `memory.MemorySampler` while a job runs."""

    seconds: float  # since the sampler started
    rss_bytes: int
    peak_rss_bytes: int
    cuda_allocated_bytes: int | None = None  # None without CUDA


@dataclass(frozen=True)
class LayerStats(Event):
    """Statistics of one linear layer's input over the calibration tokens, as the quantizer sees it.

    `masked_*` / `unmasked_*` split the tokens by whether the calibration input had a mask token
    there (dLLM activations shift with the mask ratio); None when no token of that kind was seen.
    """

    name: str
    role: str
    block: int | None
    tokens: int
    outlier_ratio: float  # max channel |x| over the median channel |x|
    kurtosis: float  # of the per-channel RMS (≈ 1 with no outlier features, large when few channels dominate)
    massive: int  # activations with |x| > 100 and > 1000x the median |x| of their token (Sun et al. 2024)
    top_channels: tuple[tuple[int, float], ...]  # (channel, max |x|), largest first
    top_tokens: tuple[tuple[int, float], ...]  # (position in the calibration sequence, max |x|), largest first
    channel_absmax: tuple[float, ...]  # per input channel, for charts
    masked_outlier_ratio: float | None
    unmasked_outlier_ratio: float | None
    masked_absmax: float | None
    unmasked_absmax: float | None


@dataclass(frozen=True)
class LayerTransformed(Event):
    """What a method's change of basis (smoothing, rotation) did to one linear layer's input, before rounding:
    the same statistics as `LayerStats`, measured before and after on the same calibration tokens."""

    name: str
    role: str
    block: int | None
    transform: str  # e.g. "Hadamard (residual) + online Hadamard", "smoothing α=0.5", "DuQuant"
    kurtosis_before: float
    kurtosis_after: float
    outlier_ratio_before: float  # max channel |x| over the median channel |x|
    outlier_ratio_after: float
    absmax_before: float  # the largest |x|, which sets the per-token activation scale
    absmax_after: float
    detail: str = ""  # the method's reason for its choice (LRQ-DiT ARS: "J = 1.7 ≥ 1.0")


@dataclass(frozen=True)
class LayerQuantized(Event):
    """One linear layer replaced by its quantized form."""

    name: str
    role: str
    block: int | None
    bits: int
    relative_error: float  # ||X Wq^T - X W^T|| / ||X W^T|| on the calibration inputs
    seconds: float  # this layer
    layer: int  # 1-based, over every layer the recipe quantizes
    layers: int
    elapsed_s: float  # since the job started
    eta_s: float  # at the rates measured so far (`quant.progress`), not an average per layer
    fraction: float = 0.0  # of the run's work done, weighted by cost (resumed blocks count as done)


@dataclass(frozen=True)
class Progress(Event):
    """A unit of a long job (a calibration pass, a method's search, one linear's rounding) starts or ends.

    `fraction` is of the whole job's work, weighted by cost, never going back; `until` is where it will be when the
    unit in flight ends at the measured rate (= `fraction` between units), so a display can fill up to it
    between events and no further."""

    fraction: float
    until: float
    elapsed_s: float
    eta_s: float | None  # None until a unit has been measured
    doing: str  # e.g. "block 1: calibrating q/k/v"


@dataclass(frozen=True)
class StreamingStarted(Event):
    """A streaming quantization (`quant.streaming`) begins: blocks are read from `shards` files one at a time."""

    shards: int  # source weight files
    blocks: int
    first_block: int  # 1-based: where this run starts (after the blocks an earlier run finished)
    note: str = ""  # what became of an earlier run's temporary folder: resumed, or started over and why


@dataclass(frozen=True)
class BlockQuantized(Event):
    """Progress: block `block` (1-based) of `blocks` done."""

    block: int
    blocks: int
    elapsed_s: float
    eta_s: float
    max_outlier_ratio: float
    mean_relative_error: float
    rss_bytes: int
    peak_rss_bytes: int


@dataclass(frozen=True)
class SensitivityProgress(Event):
    """Progress of measuring how much error each bit-width would cause (`quant.budget.sensitivity`): block `block`
    (1-based) of `blocks` measured."""

    block: int
    blocks: int
    elapsed_s: float
    eta_s: float
