"""The integer grid every method rounds onto: b-bit asymmetric or symmetric, per group of input columns.

Asymmetric (the default, as in the seed study): scale = (max - min) / (2^b - 1), zero = round(-min / scale),
q = clamp(round(w / scale) + zero, 0, 2^b - 1) and w ~ (q - zero) * scale. The range always includes 0,
as in GPTQ's reference quantizer, so zero is an integer on the grid. Symmetric: zero = 2^(b-1) and
scale = max|w| / (2^(b-1) - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int
    symmetric: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def params(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per row of `w` (rows, cols), its range shrunk by `clip` (AWQ's clip search).

        Scales are rounded to fp16 here, as they are stored, so every method rounds onto the grid it saves.
        """
        w = w.float()
        if self.symmetric:
            half = 1 << (self.bits - 1)
            scale = _fp16(w.abs().amax(1) * clip / (half - 1))
            return scale, torch.full_like(scale, half)
        lo = w.amin(1).clamp(max=0) * clip
        hi = w.amax(1).clamp(min=0) * clip
        scale = _fp16((hi - lo) / self.maxq)
        return scale, torch.clamp(torch.round(-lo / scale), 0, self.maxq)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integers for `w` (rows, cols) on the grid of per-row `scale` and `zero` (rows,) or (rows, 1)."""
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, self.maxq)

    def fake(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """`w` rounded onto the grid and mapped back to floats."""
        return (self.quantize(w, scale, zero) - zero.reshape(-1, 1)) * scale.reshape(-1, 1)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """The scale as fp16 will hold it; an all-zero row gets scale 1 (any scale represents it exactly)."""
    scale = scale.to(torch.float16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def group_slices(in_features: int, group_size: int | None):
    """Column ranges of the groups (one per row when group_size is None; the last group may be shorter)."""
    size = group_size or in_features
    return [slice(i, min(i + size, in_features)) for i in range(0, in_features, size)]


def rtn(w: torch.Tensor, grid: Grid, group_size: int | None, clip: torch.Tensor | None = None):
    """Round-to-nearest: (q, scales, zeros) with q (out, in) integers and scales/zeros (out, groups).

    `clip` (out, groups) shrinks each group's range (AWQ's clip search); 1.0 everywhere when None.
    """
    out_features, in_features = w.shape
    size = group_size or in_features
    if in_features % size == 0:  # every group full: one (out * groups, size) matrix, no loop
        rows = w.reshape(-1, size)
        scale, zero = grid.params(rows, 1.0 if clip is None else clip.reshape(-1))
        q = grid.quantize(rows, scale, zero).to(torch.uint8).reshape(out_features, in_features)
        return q, scale.reshape(out_features, -1), zero.reshape(out_features, -1)
    slices = group_slices(in_features, group_size)
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_features, len(slices), device=w.device)
    zeros = torch.empty_like(scales)
    for g, cols in enumerate(slices):
        scale, zero = grid.params(w[:, cols], 1.0 if clip is None else clip[:, g])
        q[:, cols] = grid.quantize(w[:, cols], scale, zero).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero
    return q, scales, zeros


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(q - zero) * scale for codes q (out, in) with contiguous groups of `group_size` columns."""
    cols = torch.arange(q.shape[1], device=q.device) // (group_size or q.shape[1])
    return (q.float() - zeros[:, cols]) * scales[:, cols]
