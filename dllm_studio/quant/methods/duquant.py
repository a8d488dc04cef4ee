"""DuQuant (Lin et al., arXiv:2406.01721): per layer, spread the outliers of its input over channels, then round.

Each linear's input x gets, online, x / s (smoothing with migration α, SmoothQuant's s from the layer's own
weight), then a block-diagonal rotation R1 found greedily from the calibration inputs (each step spreads
the largest remaining channel over its block), a zigzag permutation that deals the largest channels evenly
to the blocks, and a second greedy rotation R2 (`rotation.duquant`); the weight takes the same change
(`InputTransform`), so the full-precision layer is unchanged. Weights are then rounded to nearest per output
channel with a clip searched per row, activations per token with the recipe's clip (0.9 by default), as the
seed study ran it (no learnable clipping: its `--epochs 0`).
"""

from __future__ import annotations

import math

import torch

from dllm_studio.events import CancelToken
from dllm_studio.quant import rotation
from dllm_studio.quant.capture import transform_linear
from dllm_studio.quant.grid import rtn
from dllm_studio.quant.methods.base import STAGES, Method, by_rows, smoothing, stage_of
from dllm_studio.quant.transforms import InputTransform

BLOCK = 128  # rotation block, as DuQuant's default
STEPS = 256  # greedy rotation steps per block
SEARCH_TOKENS = 256  # calibration rows the greedy rotations are searched on (each step rotates all of them)
WEIGHT_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)  # per-row range shrinks searched for the weights (DuQuant's swc 0.8)


def outlier_transform(x: torch.Tensor, weights: list[torch.Tensor], alpha: float | None,
                      cancel: CancelToken | None = None) -> InputTransform:
    """DuQuant's transform for an input x (tokens, in) read by linears of these weights; `cancel` is checked
    per greedy rotation step."""
    in_features = x.shape[-1]
    s = smoothing(x.abs().amax(0), weights, alpha) if alpha else None
    xs = x if s is None else x / s
    block = math.gcd(in_features, BLOCK)  # e.g. a 352-wide MLP gets blocks of 32
    r1, perm, r2 = rotation.duquant(search_rows(xs), block=block, steps=STEPS, cancel=cancel)
    return InputTransform(in_features, smooth=s, rotation1=r1, perm=perm, rotation2=r2)


def shared_inputs(block) -> list[list[str]]:
    """The block's quantized linears grouped by the input they read (q/k/v, gate/up; o and down alone), so each
    group gets one transform: computed once, held once."""
    groups = [[n for n, l in block.layers.items() if l.role in roles] for roles in STAGES]
    groups += [[n] for n in block.layers if not any(n in g for g in groups)]
    return [g for g in groups if g]


def search_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows the rotations are searched on: the tokens with the largest entries (massive outliers sit on a
    few tokens and must be seen), then an even spread of the rest."""
    if x.shape[0] <= SEARCH_TOKENS:
        return x
    peaks = x.abs().amax(1)
    top = peaks.topk(SEARCH_TOKENS // 4).indices
    rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    rest[top] = False
    spread = rest.nonzero()[:, 0]
    spread = spread[torch.linspace(0, len(spread) - 1, SEARCH_TOKENS - len(top)).long()]
    return x[torch.cat([top, spread])]


def clipped_rtn(w: torch.Tensor, grid, group_size, cancel: CancelToken | None = None):
    """Round-to-nearest with each row's range shrunk by the clip in WEIGHT_CLIPS that minimises its error. Rows
    choose alone, so a chunk of them at a time (`row_chunks`) gives the same codes with temporaries of a chunk."""
    return by_rows(lambda rows: _clipped_rows(rows, grid, group_size, cancel), w)


def _clipped_rows(w: torch.Tensor, grid, group_size, cancel: CancelToken | None):
    best = None
    for clip in WEIGHT_CLIPS:
        if cancel is not None:
            cancel.check()
        q, scales, zeros = rtn(w, grid, group_size, torch.full((w.shape[0], 1), clip, device=w.device))
        err = ((q.float() - zeros) * scales - w).pow(2).sum(1)
        if best is None:
            best = [q, scales, zeros, err]
            continue
        better = err < best[3]
        for i, new in enumerate((q, scales, zeros, err)):
            best[i] = torch.where(better.view(-1, *([1] * (new.dim() - 1))), new, best[i])
    return best[:3]


def rotation_bytes(layers) -> dict[str, int]:
    """Two fp32 block rotations of (in / block) x block x block per distinct input, kept with the quantized model."""
    inputs = {(l.block, stage_of(l)): l.in_features for l in layers}
    return {"rotation matrices": sum(2 * width * math.gcd(width, BLOCK) * 4 for width in inputs.values())}


class DuQuant(Method):
    @classmethod
    def working_bytes(cls, model, layers):
        return rotation_bytes(layers)

    def prepare_block(self, block, taps):
        for group in shared_inputs(block):
            weights = [block.module.get_submodule(n).weight for n in group]
            transform = outlier_transform(taps[group[0]].inputs(), weights, self.recipe.migration, self.cancel)
            for name in group:
                transform_linear(block.module, name, transform)

    def transform_label(self, name):
        alpha = self.recipe.migration
        smooth = f"smoothing α={alpha:g} → " if alpha else ""
        return f"DuQuant: {smooth}rotation → zigzag → rotation", ""

    def round(self, linear, layer, tap):
        if tap is None:  # the LM head: no transform, plain round-to-nearest
            return super().round(linear, layer, tap)
        return self.quant_linear(linear, *clipped_rtn(linear.weight.detach().float(), self.grid, self.group_size,
                                                    self.cancel))


METHOD = DuQuant
