"""An exact change of basis of a linear layer's input, applied online before its activations are rounded.

    y = x W^T = T(x) T'(W)^T     with T(x) = orth(x / s),  T'(W) = orth(W * s)

where s is a per-channel smoothing vector (SmoothQuant/DuQuant's migration) and orth(z) = z H R1 P R2 is a
chain of orthogonal maps applied to rows: a Hadamard rotation H (QuaRot's online rotation before the down
projection), block-diagonal rotations R1, R2 and a channel permutation P between them (DuQuant, LRQ-DiT's
outlier-aware rotation). Each part is optional. Since every part of orth is orthogonal, the same row map serves
the activations and the weight, and the layer's full-precision output is unchanged: only what rounding sees is.

The parts are buffers of the quantized layer (`<layer>.transform.*` in the checkpoint), kept in fp32 whatever
the model's dtype: rounded to 16 bits a rotation is orthogonal only to about 1e-3, and the layer would no longer
compute the full-precision output exactly. That has a cost where rotations are dense: DuQuant's two fp32 128 x 128
blocks per 128 input channels are 1 KiB per input channel, half the codes of a 4-bit 4096 x 4096 layer. Linears
reading one input share one transform (q/k/v, gate/up), so a LLaDA-8B block holds four: about a fifth of its
4-bit bytes (the preflight and the bits per weight count them).
"""

from __future__ import annotations

import torch
from torch import nn

from dllm_studio.quant import rotation

PARTS = ("smooth", "hadamard", "rotation1", "perm", "rotation2")  # in the order they apply


class InputTransform(nn.Module):
    def __init__(self, in_features: int, *, smooth: torch.Tensor | None = None, hadamard: torch.Tensor | None = None,
                 rotation1: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 rotation2: torch.Tensor | None = None) -> None:
        """smooth (in,); hadamard: the Hadamard factor of the size's non-power-of-two part (m, m), see
        `rotation.hadamard_factor`; rotation1/rotation2 block-diagonal (blocks, b, b); perm (in,) column order."""
        super().__init__()
        self.in_features = in_features
        for name, value in zip(PARTS, (smooth, hadamard, rotation1, perm, rotation2)):
            if value is not None:
                value = value.detach().to(torch.int32 if name == "perm" else torch.float32)
            self.register_buffer(name, value)

    @classmethod
    def shell(cls, in_features: int, shapes: dict[str, tuple[int, ...]], device=None) -> InputTransform:
        """An empty transform with the parts a checkpoint holds (`shapes`: part name -> shape), to load into."""
        empty = {name: torch.zeros(shape, device=device) for name, shape in shapes.items() if name in PARTS}
        return cls(in_features, **empty)

    def parts(self) -> list[str]:
        return [name for name in PARTS if getattr(self, name) is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) for x (..., in), in x's dtype (computed in fp32)."""
        z = x.float()
        if self.smooth is not None:
            z = z / self.smooth
        return self._orth(z).to(x.dtype)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """T'(W) for W (out, in), fp32: the weight that, fed T(x), gives the original output."""
        z = w.float()
        if self.smooth is not None:
            z = z * self.smooth
        return self._orth(z)

    def _orth(self, z: torch.Tensor) -> torch.Tensor:
        if self.hadamard is not None:
            z = rotation.hadamard_transform(z, self.hadamard)
        if self.rotation1 is not None:
            z = rotation.block_rotate(z, self.rotation1)
        if self.perm is not None:
            z = z[..., self.perm.long()]
        if self.rotation2 is not None:
            z = rotation.block_rotate(z, self.rotation2)
        return z

    def _apply(self, fn, recurse=True):
        # Move with the model, but keep fp32 (and int32): `.to(bfloat16)` would round the rotations.
        kept = {name: getattr(self, name).dtype for name in self.parts()}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            setattr(self, name, getattr(self, name).to(dtype))
        return self

    def describe(self) -> str:
        names = {"smooth": "smoothing", "hadamard": "Hadamard", "rotation1": "block rotation", "perm": "zigzag permutation",
                 "rotation2": "block rotation"}
        return " → ".join(names[p] for p in self.parts()) or "none"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, parts={self.parts()}"
