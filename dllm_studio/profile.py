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
