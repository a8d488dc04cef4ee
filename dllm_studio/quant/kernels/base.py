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
    # Whether it multiplies integer activations (the rounding is the arithmetic), rather than rounding them in
    # floating point to reproduce the numerics (`kernels.simulated`).
    integer_activations: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, layer, device: torch.device) -> str | None:
        """None if this kernel runs `layer` on `device`, else the reason it does not."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, in) -> (tokens, out) in x's dtype, without the bias."""
        raise NotImplementedError


# Why the integer kernels refuse a codebook layer (`QuantLinear.codebook`): they compute (q - zero) * scale.
CODEBOOK_REASON = "codes index a per-row codebook (non-uniform grid); only the dequantize kernel decodes them"


def quantize_activations(x: torch.Tensor, bits: int = 8, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token dynamic quantization at `bits` with a clip ratio: (codes int8 (tokens, in), scales
    fp32 (tokens, 1)), x ~ codes * scales. The scale maps clip * max|x| of each token to the largest level
    2^(bits-1) - 1; values beyond it saturate (clipping trades a few outliers for finer levels everywhere)."""
    top = (1 << bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).float().mul_(clip).clamp_min_(1e-8) / top
    return torch.round(x.float() / scale).clamp_(-top, top).to(torch.int8), scale


def dynamic_int8(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_activations` at 8 bits (W8A8)."""
    return quantize_activations(x, 8, clip)


def fake_quantize_activations(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """x rounded as `quantize_activations` rounds it, back in x's dtype: the simulated numerics of A`bits`."""
    q, scale = quantize_activations(x, bits, clip)
    return (q.float() * scale).to(x.dtype)


def per_channel(layer) -> bool:
    """Whether `per_channel_int8` can hold the layer: 8 or at most 4 bits, one group per row, no act-order."""
    return layer.bits in (2, 3, 4, 8) and layer.codebook is None and layer.groups == 1 and layer.g_idx is None


def per_channel_int8(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A `per_channel` layer as signed int8 weights, fp32 scales and the zero-point correction per row, so that
    W_hat = weights * scales[:, None] + correction[:, None].

    8 bits: q - 128 (one XOR a byte), correction (128 - zero) * scale (0 for a symmetric grid). At most 4
    bits, q - zero itself fits in int8 (|q - zero| < 16), so the correction is 0 for any grid: exact products."""
    scales = layer.scales[:, 0].float()
    if layer.bits == 8:
        weight = (layer.stored_qweight() ^ 0x80).view(torch.int8)  # q - 128 in two's complement
        return weight, scales, (128 - layer.zeros()[:, 0].float()) * scales
    weight = (layer.codes().to(torch.int16) - layer.zeros().to(torch.int16)).to(torch.int8)
    return weight, scales, torch.zeros_like(scales)
