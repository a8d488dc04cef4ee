"""`QuantLinear`: a linear layer that holds its weight as packed b-bit integers.

Buffers (what the native checkpoint stores, under the layer's name):
    qweight  uint8 (out, packed in)      b-bit codes packed along the input dimension
    scales   fp16  (out, groups)         one scale per row and group of `group_size` input columns
    qzeros   uint8 (packed out*groups,)  the zero points, row by row, packed as one stream (per-row
                                         packing would pad every row to whole bytes)
    g_idx    int32 (in,)                 group of each input column; only with act-order, where
                                         GPTQ's column order makes groups non-contiguous
    codebook fp16  (out, 2^b)            instead of scales, qzeros and g_idx: the value each code stands for,
                                         per row (a non-uniform grid such as twin-log's); code c of row r
                                         decodes to codebook[r, c]
    bias     (out,)                      as the original layer had it
    transform.*                          an optional `InputTransform` (smoothing, rotations) applied to
                                         the input first, fp32 (int32 perm); see `quant.transforms`
How the layer runs is a kernel's business (`quant.kernels`: tiled dequantization, torch's int4/int8
kernels, int8 x int8 for 8-bit activations), chosen per token-count bucket at the first call and derived
from these buffers, never written back: the stored form stays the one source of truth. `act_bits` 8 or 4
marks a layer whose activations are rounded per token, symmetric, to that many bits, with the scale set at
`act_clip` times each token's largest magnitude (`kernels.base.quantize_activations`); 16 leaves them alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dllm_studio.quant import kernels
from dllm_studio.quant.packing import pack, packed_size, unpack

if TYPE_CHECKING:  # only a type here: loading a transform-free layer needs none of the rotation code
    from dllm_studio.quant.transforms import InputTransform

ACT_BITS = (16, 8, 4)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, *,
                 bias: bool = False, act_order: bool = False, act_bits: int = 16, act_clip: float = 1.0,
                 transform: InputTransform | None = None, codebook: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if act_bits not in ACT_BITS or not 0 < act_clip <= 1:
            raise ValueError(f"act_bits {act_bits} / act_clip {act_clip}: activations are {ACT_BITS} bits, "
                             "clipped at a ratio in (0, 1]")
        if codebook and (act_order or group_size not in (None, in_features)):
            raise ValueError("a codebook layer has one codebook per row: no groups, no act-order")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.act_bits = bits, group_size or in_features, act_bits
        self.act_clip = float(act_clip)
        self.transform = transform  # a child module: its parts save as `<layer>.transform.<part>`
        self.kernel_choice: dict[int, str] = {}  # token bucket -> kernel name
        self.built_kernels: dict = {}  # kernel name -> the kernel, built from the buffers below
        self.codes_source = None  # a kernel holding the codes in its own layout, once `qweight` is released
        groups = -(-in_features // self.group_size)
        empty = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("qweight", empty(out_features, packed_size(in_features, bits), dtype=torch.uint8))
        uniform = not codebook
        self.register_buffer("scales", empty(out_features, groups, dtype=torch.float16) if uniform else None)
        self.register_buffer("qzeros", empty(packed_size(out_features * groups, bits), dtype=torch.uint8)
                             if uniform else None)
        self.register_buffer("g_idx", empty(in_features, dtype=torch.int32) if act_order else None)
        self.register_buffer("codebook", empty(out_features, 1 << bits, dtype=torch.float16) if codebook else None)
        self.bias = nn.Parameter(empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int | None, *, g_idx: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, act_bits: int = 16, act_clip: float = 1.0,
                   transform: InputTransform | None = None) -> QuantLinear:
        """Build from integer codes q (out, in), per-group scales and zeros (out, groups) and, for
        act-order, each column's group. With a `transform` T, the codes are those of T'(W) (`transform.weight`)."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, act_order=g_idx is not None,
                    act_bits=act_bits, act_clip=act_clip, transform=transform,
                    dtype=bias.dtype if bias is not None else torch.float32, device=q.device)
        layer.qweight.copy_(pack(q, bits))
        layer.scales.copy_(scales.to(torch.float16))
        layer.qzeros.copy_(pack(zeros.round().to(torch.uint8).reshape(-1), bits))
        if g_idx is not None:
            layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_codebook(cls, q: torch.Tensor, codebook: torch.Tensor, bits: int, *, bias: torch.Tensor | None = None,
                      act_bits: int = 16, act_clip: float = 1.0, transform: InputTransform | None = None) -> QuantLinear:
        """Build from codes q (out, in) that index each row's codebook (out, 2^bits) (`quant.twin_log`)."""
        out_features, in_features = q.shape
        if codebook.shape != (out_features, 1 << bits):
            raise ValueError(f"a {bits}-bit codebook for {out_features} rows is ({out_features}, {1 << bits}), "
                             f"not {tuple(codebook.shape)}")
        layer = cls(in_features, out_features, bits, None, bias=bias is not None, act_bits=act_bits, act_clip=act_clip,
                    transform=transform, codebook=True, dtype=bias.dtype if bias is not None else torch.float32,
                    device=q.device)
        layer.qweight.copy_(pack(q, bits))
        layer.codebook.copy_(codebook.to(torch.float16))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def _apply(self, fn, recurse=True):
        self.forget_kernels()  # built from the old tensors, maybe on another device; the codes come back first
        # `.to(dtype)` would round the fp16 scales (or codebook) through another float type; keep them, move them only.
        kept = {name: t for name in ("scales", "codebook") if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            if self._buffers[name].dtype != torch.float16:
                self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def release_codes(self, kernel) -> None:
        """Let `kernel` hold the only copy of the codes (a W4 model would otherwise hold them twice, once
        packed for export and once for the kernel). Kernels that read `qweight` are dropped and rebuilt;
        `state_dict`, `codes()` and any copy get the stored form back from `kernel.codes()`, exactly."""
        self.codes_source = kernel
        self.qweight = torch.empty(0, dtype=torch.uint8, device=self.qweight.device)
        self.register_buffer("kernel_codes", kernel.packed, persistent=False)  # counted where memory is counted
        self.built_kernels = {name: k for name, k in self.built_kernels.items() if k is kernel}

    def stored_qweight(self) -> torch.Tensor:
        """The packed codes as stored (the `qweight` buffer, or rebuilt from the kernel that holds them)."""
        return self.qweight if self.codes_source is None else pack(self.codes_source.codes(), self.bits)

    def forget_kernels(self) -> None:
        if self.codes_source is not None:
            self.qweight = self.stored_qweight()
            del self._buffers["kernel_codes"]
            self.codes_source = None
        self.kernel_choice, self.built_kernels = {}, {}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes_source is not None:
            destination[prefix + "qweight"] = self.stored_qweight()

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_kernels()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # copies (deepcopy, pickling) start without kernels: they hold the old tensors
        state = super().__getstate__()
        if self.codes_source is not None:
            buffers = {k: v for k, v in state["_buffers"].items() if k != "kernel_codes"}
            state = {**state, "_buffers": {**buffers, "qweight": self.stored_qweight()}}
        return {**state, "kernel_choice": {}, "built_kernels": {}, "codes_source": None}

    @property
    def groups(self) -> int:
        return 1 if self.codebook is not None else self.scales.shape[1]

    def codes(self) -> torch.Tensor:
        """The integer codes, (out, in) uint8."""
        if self.codes_source is not None:
            return self.codes_source.codes()
        return unpack(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Zero points, (out, groups) uint8."""
        if self.codebook is not None:
            raise ValueError("a codebook layer's codes index its codebook: it has no zero points")
        return unpack(self.qzeros, self.bits, self.out_features * self.groups).view(self.out_features, self.groups)

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) as the grid represents it: (q - zero) * scale, as one fused q * s - z * s, or
        for a codebook layer each code's codebook entry."""
        if self.codebook is not None:
            return torch.gather(self.codebook.to(dtype), 1, self.codes().long())
        q = self.codes().to(dtype)
        scales = self.scales.to(dtype)
        offsets = -self.zeros().to(dtype) * scales
        if self.g_idx is None and self.in_features % self.group_size == 0:  # the common case: a reshape, no gather
            shape = (self.out_features, self.groups, self.group_size)
            return torch.addcmul(offsets[..., None], q.view(shape), scales[..., None]).view_as(q)
        cols = self.column_groups()
        return torch.addcmul(offsets[:, cols], q, scales[:, cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        y = kernels.run(self, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def nbytes(self) -> int:
        """Bytes of what it stores."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors its state dict saves, by name, as held: to count bytes without the state dict's repacking of
        codes a kernel holds (`stored_qweight`: a pass over the weight, seconds for an 8B's layer), `qweight` is then
        a meta tensor of the stored shape."""
        held = {name: t for name, t in self.named_parameters()}
        for prefix, module in self.named_modules():
            held.update({f"{prefix}.{name}" if prefix else name: t for name, t in module._buffers.items()
                         if t is not None and name not in module._non_persistent_buffers_set})
        if self.codes_source is not None:
            held["qweight"] = torch.empty(self.out_features, packed_size(self.in_features, self.bits),
                                          dtype=torch.uint8, device="meta")
        return held

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.g_idx is not None}, act_bits={self.act_bits}, "
                f"act_clip={self.act_clip:g}, bias={self.bias is not None}, "
                f"transform={self.transform.parts() if self.transform is not None else None}"
                f"{', codebook=True' if self.codebook is not None else ''}")
