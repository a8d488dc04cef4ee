"""Activation statistics: how outlier-heavy the inputs of each linear layer are.

dLLMs, like autoregressive LLMs, carry a few activation channels far larger than the rest; these
outliers are what makes low-bit activation quantization hard (arXiv:2508.14896 §outliers). The
headline metric is the largest channel magnitude over the median channel magnitude, per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dllm_studio.models.base import DiffusionLM


@dataclass(frozen=True)
class LayerOutliers:
    name: str
    role: str
    block: int | None
    outlier_ratio: float  # max over channels of |x| / median over channels of |x| (max over tokens first)
    top_channel: int
    top_magnitude: float


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel maximum |x| over every other dimension: (..., C) -> (C,)."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()


def outlier_ratio(absmax: torch.Tensor) -> float:
    return float(absmax.max() / absmax.median().clamp_min(1e-12))


@contextmanager
def capture_linear_inputs(model: DiffusionLM, names: list[str]):
    """Record the running per-channel |x| maximum of the inputs of the named linear layers."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            absmax = channel_absmax(args[0])
            seen[name] = absmax if name not in seen else torch.maximum(seen[name], absmax)
        return record

    handles = [model.module.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def activation_outliers(model: DiffusionLM, texts: list[str], roles: tuple[str, ...] = ("q", "down")) -> list[LayerOutliers]:
    """Outlier statistics of the inputs of the linear layers with these roles, over `texts`.

    The default roles see the two distinct inputs of a block worth watching: the normalised
    residual stream (q's input, shared by k, v, gate and up) and the MLP's hidden activation (down's input).
    """
    layers = [l for l in model.linear_layers() if l.role in roles]
    with capture_linear_inputs(model, [l.name for l in layers]) as seen:
        for text in texts:
            model.forward(torch.tensor([model.tokenizer.encode(text)]))
    result = []
    for layer in layers:
        absmax = seen[layer.name]
        top = int(absmax.argmax())
        result.append(LayerOutliers(layer.name, layer.role, layer.block, outlier_ratio(absmax), top, float(absmax[top])))
    return result


# The studio flags (draws red) a layer whose largest input channel exceeds this many times its median
# channel: a display threshold for "outlier-heavy", not a number from the literature.
OUTLIER_ALARM = 20.0
MASSIVE_ABS = 100.0  # Sun et al. 2024 (arXiv:2402.17762): |x| > 100 ...
MASSIVE_RATIO = 1000.0  # ... and > 1000x the median |x| of the token's own hidden state
TOP_K = 8
STATS_CHUNK = 1 << 21  # values per chunk of tokens the statistics look at (8 MB at fp32)


class InputStats:
    """Streaming statistics of a linear layer's input, batch by batch, split by masked/unmasked tokens.

    Feeds `LayerStats` events: per-channel max |x| (overall and per token kind), the kurtosis of the
    per-channel RMS, the count of massive activations, and the top channels and token positions.
    """

    def __init__(self, channels: int) -> None:
        self.absmax = torch.zeros(channels)
        self.absmax_masked = torch.zeros(channels)
        self.absmax_unmasked = torch.zeros(channels)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)
        self.tokens = self.masked_tokens = self.massive = 0
        self.top_tokens: list[tuple[float, int]] = []  # (max |x|, position in its sequence)

    def add(self, x: torch.Tensor, masked: torch.Tensor | None = None) -> None:
        """x (B, T, C) or (N, C); masked (B, T) or (N,) bool: which tokens were mask tokens."""
        rows = x.detach().reshape(-1, x.shape[-1])
        positions = torch.arange(x.shape[-2]).repeat(rows.shape[0] // x.shape[-2]) if x.dim() == 3 else \
            torch.arange(rows.shape[0])
        m = torch.zeros(rows.shape[0], dtype=torch.bool) if masked is None else masked.reshape(-1).cpu()
        # A chunk of tokens at a time: on an 8B's down projection a whole batch's |x| in float64, squared, with its
        # median's sorted copy, was ~0.6 GB of temporaries beside the Hessians.
        step = max(1, STATS_CHUNK // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            self._add(rows[start:start + step], m[start:start + step], positions[start:start + step])

    def _add(self, x: torch.Tensor, m: torch.Tensor, positions: torch.Tensor) -> None:
        a = x.abs().float().cpu()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        if m.any():
            self.absmax_masked = torch.maximum(self.absmax_masked, a[m].amax(0))
        if (~m).any():
            self.absmax_unmasked = torch.maximum(self.absmax_unmasked, a[~m].amax(0))
        self.sumsq += a.double().pow_(2).sum(0)
        self.tokens += a.shape[0]
        self.masked_tokens += int(m.sum())
        token_max = a.amax(1)
        median = a.median(1).values
        self.massive += int(((a > MASSIVE_ABS) & (a > MASSIVE_RATIO * median[:, None])).sum())
        k = min(TOP_K, token_max.numel())
        values, index = token_max.topk(k)
        merged = self.top_tokens + list(zip(values.tolist(), positions[index].tolist()))
        self.top_tokens = sorted(merged, reverse=True)[:TOP_K]

    def kurtosis(self) -> float:
        """mean(s^4) / mean(s^2)^2 of the per-channel RMS s (He et al. 2024): ~1 without outlier features."""
        s2 = self.sumsq / max(self.tokens, 1)
        return float((s2.pow(2).mean() / s2.mean().pow(2).clamp_min(1e-30)))

    def event(self, name: str, role: str, block: int | None):
        from dllm_studio.events import LayerStats

        values, channels = self.absmax.topk(min(TOP_K, self.absmax.numel()))
        unmasked = self.tokens - self.masked_tokens
        return LayerStats(
            name=name, role=role, block=block, tokens=self.tokens, outlier_ratio=outlier_ratio(self.absmax),
            kurtosis=self.kurtosis(), massive=self.massive,
            top_channels=tuple(zip(channels.tolist(), [round(v, 4) for v in values.tolist()])),
            top_tokens=tuple((p, round(v, 4)) for v, p in self.top_tokens),
            channel_absmax=tuple(round(v, 5) for v in self.absmax.tolist()),
            masked_outlier_ratio=outlier_ratio(self.absmax_masked) if self.masked_tokens else None,
            unmasked_outlier_ratio=outlier_ratio(self.absmax_unmasked) if unmasked else None,
            masked_absmax=float(self.absmax_masked.max()) if self.masked_tokens else None,
            unmasked_absmax=float(self.absmax_unmasked.max()) if unmasked else None,
        )
