"""What calibration shows a block's linears: hooks that gather each one's inputs while batches flow through.

The pipeline and every method share these: the block-0 inputs of each calibration batch, a run of a block,
and `collect`, which hooks the named linears and returns a `Tap` per layer (activation statistics for the
live profile, GPTQ's Hessian, and a sample of input rows for searches and the error report).
A linear wrapped in a float `Transformed` (a method's change of basis, before rounding) is hooked inside
the wrapper, so the tap sees the inputs as the layer will: transformed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dllm_studio.profile import InputStats
from dllm_studio.quant.gptq import Hessian
from dllm_studio.quant.transforms import InputTransform

SAMPLE_TOKENS = 4096  # input rows kept per linear for searches and the error report
BATCH = 8  # calibration sequences per forward pass


@dataclass
class Tap:
    """What the hooks gather about one linear's input while calibration batches flow through a block."""

    stats: InputStats | None = None
    hessian: Hessian | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0

    def add(self, x: torch.Tensor, masked: torch.Tensor | None) -> None:
        if self.stats is not None:
            self.stats.add(x, masked)
        if self.hessian is not None:
            self.hessian.add(x)
        if self.sampled < SAMPLE_TOKENS:
            rows = x.detach().reshape(-1, x.shape[-1])[: SAMPLE_TOKENS - self.sampled]
            self.sample.append(rows.float())
            self.sampled += rows.shape[0]

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample)


class Transformed(nn.Module):
    """A full-precision linear fed through an `InputTransform`: its weight already holds transform.weight(W),
    so the output is the original layer's. What a method leaves in the block before the rounding."""

    def __init__(self, linear: nn.Linear, transform: InputTransform) -> None:
        super().__init__()
        self.linear, self.transform = linear, transform
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.transform(x))


def transform_linear(block: nn.Module, name: str, transform: InputTransform) -> None:
    """Wrap the linear at `name` so its input goes through `transform`, changing the weight to match."""
    linear = block.get_submodule(name)
    linear.weight.data = transform.weight(linear.weight.data).to(linear.weight.dtype)
    set_submodule(block, name, Transformed(linear, transform))


def unwrap(module: nn.Module) -> tuple[nn.Module, InputTransform | None]:
    """(the linear, its transform or None) of a block member that may be `Transformed`."""
    return (module.linear, module.transform) if isinstance(module, Transformed) else (module, None)


def collect(block: nn.Module, names, states, masks, *, stats: bool = False, hessian: bool = False) -> dict[str, Tap]:
    """Run the calibration states through the block with hooks on the linears `names`; what they saw."""
    taps = {}
    current: list[torch.Tensor | None] = [None]
    handles = []
    for name in names:
        linear, _ = unwrap(block.get_submodule(name))
        tap = Tap(InputStats(linear.in_features) if stats else None,
                  Hessian(linear.in_features, linear.weight.device) if hessian else None)
        taps[name] = tap
        handles.append(linear.register_forward_pre_hook(lambda m, args, tap=tap: tap.add(args[0], current[0])))
    try:
        for (args, kwargs), mask in zip(states, masks):
            current[0] = mask
            run(block, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return taps


class _Captured(Exception):
    pass


def block_inputs(module: nn.Module, first_block: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for each calibration batch (hidden states first)."""
    captured = []

    def grab(m, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in ids.split(BATCH):
            try:
                module(batch, None)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def run(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
