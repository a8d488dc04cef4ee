"""What every kernel is: built once from a layer's stored form, then called on (tokens, in) activations.

A kernel reads the layer's codes, scales, zero points and g_idx (whatever method made them) and may derive
its own packed copy of them at construction; it never writes back, so an export is the same bytes whichever
kernel ran. `unsupported` says, before anything is built, why a kernel cannot run a layer on a device.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Kernel:
    name: ClassVar[str]  # the key users and the cache see: "dequant", "int4", "int8", "w8a8"
    label: ClassVar[str]  # what the app shows

    @classmethod
    def unsupported(cls, layer, device: torch.device) -> str | None:
        """None if this kernel runs `layer` on `device`, else the reason it does not."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, in) -> (tokens, out) in x's dtype, without the bias."""
        raise NotImplementedError


def dynamic_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: (codes int8 (tokens, in), scales fp32 (tokens, 1)), x ~ codes * scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def per_channel_int8(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """An 8-bit, one-group-per-row layer as signed int8 weights (q - 128), fp32 scales and the zero-point
    correction (128 - zero) * scale per row (zero for a symmetric grid); None when its grid has groups."""
    if layer.bits != 8 or layer.groups != 1 or layer.g_idx is not None:
        return None
    weight = (layer.qweight ^ 0x80).view(torch.int8)  # q - 128 in two's complement: one XOR, one byte per weight
    scales = layer.scales[:, 0].float()
    correction = (128 - layer.zeros()[:, 0].float()) * scales
    return weight, scales, correction
