"""Int8 kernels for per-channel layers: int8 weight-only (`_weight_int8pack_mm`) and int8 x int8 (W8A8, W4A8).

Both take the stored codes as signed int8 (8 bits: q - 128) with one scale per output row. W8A8 adds an
asymmetric zero point back as (128 - z) * s * sum(x) per row from exact int32 products; the weight-only kernel
computes and returns bf16 (its fp32 path is ~25x slower on CPUs; cpu-kernels.md), where adding it back after
the cancellation would lose the result's low bits, so it takes symmetric grids only. W8A8 runs only for layers
quantized with 8-bit activations: the int32 products of `torch._int_mm` are the quantized numerics, not an
approximation of a float layer. It also runs W4A8 (and W3/W2): a code of at most 4 bits is stored as q - z,
which int8 holds exactly, so no correction is needed. A4 has no integer kernel here; it is simulated.
"""

from __future__ import annotations

import torch

from dllm_studio.quant.kernels.base import CODEBOOK_REASON, Kernel, per_channel, per_channel_int8, quantize_activations


class _PerChannel(Kernel):
    def __init__(self, layer) -> None:
        self.weight, self.scales, self.correction = per_channel_int8(layer)
        self.asymmetric = bool(self.correction.any())

    def _corrected(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            y = y + x.float().sum(-1, keepdim=True).to(y.dtype) * self.correction.to(y.dtype)
        return y


class Int8(_PerChannel):
    name = "int8"
    label = "int8 weight-only (torch _weight_int8pack_mm, bf16)"

    @classmethod
    def unsupported(cls, layer, device: torch.device) -> str | None:
        if layer.codebook is not None:
            return CODEBOOK_REASON
        if layer.act_bits != 16:
            return "the layer's activations are quantized too (W8A8 kernel)"
        if layer.bits != 8 or not per_channel(layer):
            return "needs 8-bit codes with one scale per output channel"
        if not layer.qweight.is_meta and bool((layer.zeros() != 128).any()):  # (a model on meta: `info`)
            return "needs a symmetric grid (zero point 128)"
        return None

    def __init__(self, layer) -> None:
        super().__init__(layer)
        self.bf16_scales = self.scales.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        return torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.bf16_scales).to(x.dtype)


class W8A8(_PerChannel):
    name = "w8a8"
    label = "int8 x int8 (torch._int_mm, per-token activation scales)"
    integer_activations = True
    MIN_TOKENS = 17  # torch._int_mm wants more than 16 rows; smaller calls are padded

    @classmethod
    def unsupported(cls, layer, device: torch.device) -> str | None:
        if layer.codebook is not None:
            return CODEBOOK_REASON
        if layer.act_bits != 8:
            return "only for layers quantized with 8-bit activations"
        if not per_channel(layer):
            return "needs 8-bit or at most 4-bit codes with one scale per output channel"
        if layer.in_features % 8 or layer.out_features % 8:
            return "torch._int_mm needs in and out features divisible by 8"
        return None

    def __init__(self, layer) -> None:
        super().__init__(layer)
        self.weight_t = self.weight.T  # a view: _int_mm reads the column-major layout directly
        self.clip = layer.act_clip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_activations(x, 8, self.clip)
        tokens = q.shape[0]
        if tokens < self.MIN_TOKENS:
            q = torch.nn.functional.pad(q, (0, 0, 0, self.MIN_TOKENS - tokens))
        acc = torch._int_mm(q, self.weight_t)[:tokens]
        y = acc.float() * scale * self.scales
        xq = q[:tokens].float() * scale  # the correction sees the same rounded activations as the product
        return self._corrected(y, xq).to(x.dtype)
