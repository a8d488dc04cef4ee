"""What calibration shows a block's linears: hooks that gather each one's inputs while batches flow through.

The pipeline and every method share these: the block-0 inputs of each calibration batch, a run of a block,
and `collect`, which hooks the named linears and returns a `Tap` per layer (activation statistics for the
live profile, GPTQ's Hessian, and a sample of input rows for searches and the error report).
A linear wrapped in a float `Transformed` (a method's change of basis, before rounding) is hooked inside
the wrapper, so the tap sees the inputs as the layer will: transformed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from dllm_studio.events import CancelToken
from dllm_studio.profile import InputStats
from dllm_studio.quant.gptq import Hessian
from dllm_studio.quant.transforms import InputTransform

SAMPLE_TOKENS = 4096  # input rows kept per distinct linear input for searches and the error report
# Calibration sequences per forward pass. Cancel is checked between a block's leaf modules, so one module on one
# batch is the longest wait: 2 x 256 tokens through an 8B's 4096 x 12288 MLP matmul is ~0.6 s on one AVX2 core
# (8 were ~2.5 s); the matmuls stay large enough to run at full speed.
BATCH = 2
SAMPLE_DTYPE = torch.bfloat16  # how sampled rows are kept when the input's own dtype is wider


class Sample:
    """Up to SAMPLE_TOKENS input rows of a linear, kept at 16 bits (the model's own when it has them, else bf16):
    the searches and the error report read them as float32, a handful of layers at a time.

    Linears that read the very same input tensor (q, k and v after one norm; gate and up after another) share
    one Sample: each adds the tensor, and a tensor just added is not added again. The last one added is held
    until `release` so that no other tensor can take its place in memory and pass for it."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.count = 0
        self.source: torch.Tensor | None = None

    def holds(self, x: torch.Tensor) -> bool:
        """Whether x is the tensor added last (the same object, or a view of the same memory and layout)."""
        s = self.source
        return s is not None and (s is x or (s.data_ptr() == x.data_ptr() and s.shape == x.shape
                                              and s.stride() == x.stride() and s.dtype == x.dtype))

    def add(self, x: torch.Tensor) -> None:
        if self.holds(x):
            return
        self.source = x
        if self.count < SAMPLE_TOKENS:
            rows = x.detach().reshape(-1, x.shape[-1])[: SAMPLE_TOKENS - self.count]
            dtype = x.dtype if x.element_size() <= SAMPLE_DTYPE.itemsize else SAMPLE_DTYPE
            self.rows.append(rows.to(dtype, copy=True))  # a copy: a view would keep the whole batch alive
            self.count += rows.shape[0]

    def release(self) -> None:
        self.source = None

    def tensor(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        x = torch.cat(self.rows)
        return x if dtype is None else x.to(dtype)


@dataclass
class Tap:
    """What the hooks gather about one linear's input while calibration batches flow through a block."""

    stats: InputStats | None = None
    hessian: Hessian | None = None
    sample: Sample = field(default_factory=Sample)

    def add(self, x: torch.Tensor, masked: torch.Tensor | None) -> None:
        if self.stats is not None:
            self.stats.add(x, masked)
        if self.hessian is not None:
            self.hessian.add(x)
        self.sample.add(x)

    def inputs(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The sampled input rows (tokens, in) as `dtype` (None: as stored, at 16 bits)."""
        return self.sample.tensor(dtype)


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


def collect(block: nn.Module, names, states, masks, *, stats: bool = False, hessian: bool = False,
            cancel: CancelToken | None = None) -> dict[str, Tap]:
    """Run the calibration states through the block with hooks on the linears `names`; what they saw.

    `cancel` is checked as the batches run (`checking`)."""
    taps = {}
    current: list[torch.Tensor | None] = [None]
    recent: list[Sample | None] = [None]  # the sample the last hook added to, for its neighbour to share
    handles = []

    def hook(tap: Tap, x: torch.Tensor) -> None:
        if tap.sample.count == 0 and recent[0] is not None and recent[0].holds(x):
            tap.sample = recent[0]  # the first batch tells which linears read one input
        tap.add(x, current[0])
        recent[0] = tap.sample

    for name in names:
        linear, _ = unwrap(block.get_submodule(name))
        tap = Tap(InputStats(linear.in_features) if stats else None,
                  Hessian(linear.in_features, linear.weight.device) if hessian else None)
        taps[name] = tap
        handles.append(linear.register_forward_pre_hook(lambda m, args, tap=tap: hook(tap, args[0])))
    try:
        with checking(block, cancel):
            for (args, kwargs), mask in zip(states, masks):
                current[0] = mask
                run(block, args, kwargs)
    finally:
        for h in handles:
            h.remove()
        for tap in taps.values():
            tap.sample.release()
    return taps


@contextlib.contextmanager
def checking(block: nn.Module, cancel: CancelToken | None):
    """Inside this context, `cancel` is checked before every leaf module of `block` runs (each linear, quantized or
    not, and each norm): one calibration batch through an 8B's block takes seconds on a laptop's cores."""
    handles = [] if cancel is None else [m.register_forward_pre_hook(lambda m, args: cancel.check())
                                         for m in block.modules() if next(m.children(), None) is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
