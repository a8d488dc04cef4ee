"""torch's int4 weight-only kernels (tinygemm): `_weight_int4pack_mm_for_cpu` and, on CUDA, `_weight_int4pack_mm`.

Any grid of at most 4 bits fits: a 2- or 3-bit code is a 4-bit code that never uses the top values, so W3
and W2 layers run at W4 speed. The kernel computes (q - 8) * s + m per group with m in bf16, so each group's
codes are first shifted by c = 8 - z where the 4-bit range allows it (always below 4 bits), which makes
m = (8 - c - z) * s exactly 0: unshifted 2-bit codes would leave an m of ~8 s and a bf16 rounding of ~3 %
in every weight. Act-order layers are packed with their columns sorted by group, and the input is
permuted the same way per call; a per-channel layer repeats its one scale over groups of 128 columns.
Packing happens once, here; the kernel computes in bf16 (cpu-kernels.md: its fp32 path is ~30x slower).

On CPU the packed codes are the layer's codes, rearranged: byte (b, k, j) of the (out / 32, in, 16) layout
holds row 32 b + j in its low nibble and row 32 b + 16 + j in its high one. So the layer keeps one copy of its
codes (`QuantLinear.release_codes`): `rows` hands them to the dequantize kernel, `codes` gives the stored form
back exactly for export. (The CUDA layout is torch's tiled one; there the layer keeps its own copy.)
"""

from __future__ import annotations

import torch

from dllm_studio.quant.kernels.base import CODEBOOK_REASON, Kernel
from dllm_studio.quant.packing import unpack

GROUPS = (256, 128, 64, 32)  # group sizes the kernels take
CHUNK = 1 << 22  # codes packed per step


def _kernel_group(layer) -> int | None:
    """The kernel's group size for `layer`, or None where its groups are not runs of one size it takes."""
    if layer.groups == 1 and layer.g_idx is None:
        return next((g for g in GROUPS if layer.in_features % g == 0), None)
    if layer.group_size not in GROUPS or layer.in_features % layer.group_size:
        return None
    if layer.g_idx is not None and bool((torch.bincount(layer.g_idx.long()) != layer.group_size).any()):
        return None  # act-order groups of uneven sizes: sorting the columns would not line them up
    return layer.group_size


class Int4(Kernel):
    name = "int4"
    label = "int4 tinygemm (torch _weight_int4pack_mm, bf16)"

    @classmethod
    def unsupported(cls, layer, device: torch.device) -> str | None:
        if layer.codebook is not None:
            return CODEBOOK_REASON
        if layer.act_bits != 16:
            return "weight-only kernel; the layer quantizes its activations too"
        if layer.bits > 4:
            return f"{layer.bits}-bit codes do not fit its 4-bit slots"
        if _kernel_group(layer) is None:
            return f"group size {layer.group_size} over {layer.in_features} columns (it takes {GROUPS})"
        if device.type == "cpu" and layer.out_features % 32:
            return "the CPU kernel packs output rows in blocks of 32"
        if device.type == "cuda" and (layer.out_features % 8 or layer.in_features % 128):
            return "the CUDA kernel needs out features divisible by 8 and in features by 128"
        if device.type not in ("cpu", "cuda"):
            return f"no int4 kernel for {device.type}"
        return None

    def __init__(self, layer) -> None:
        self.cuda = layer.scales.device.type == "cuda"
        self.holds_codes = not self.cuda  # its layout can be read back (see the module docstring)
        self.group = _kernel_group(layer)
        self.in_features, self.perm = layer.in_features, None
        zeros = layer.zeros().to(torch.int32)
        shift = (8 - zeros).clamp(0, 16 - (1 << layer.bits))
        groups = layer.column_groups()
        self.shift, self.shift_cols = shift.to(torch.uint8), groups  # undone by `codes`
        if layer.g_idx is not None:
            self.perm = torch.argsort(layer.g_idx.long(), stable=True)
            groups = groups[self.perm]
        kernel_groups = layer.in_features // self.group
        # One (scale, m) pair per kernel group: the stored group of the kernel group's first column.
        first = groups[:: self.group][:kernel_groups]
        scales = layer.scales.float()[:, first]
        offsets = (8 - shift[:, first] - zeros[:, first]).float() * scales
        self.scales_and_zeros = torch.stack((scales, offsets), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if self.cuda:
            q = self._kernel_codes(layer, 0, layer.out_features)
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # tinygemm's CUDA input: even column high
            tiles = 8 if layer.in_features % 256 == 0 else 4
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), tiles)
            return
        # Blocks of 32 rows pack independently, so a few at a time keeps the int32 temporaries the packing op
        # wants to ~16 MB instead of 8 bytes a weight for the whole layer (400 MB at 4096 x 12288).
        self.packed = torch.empty(layer.out_features, layer.in_features // 2, dtype=torch.uint8)
        rows = max(32, CHUNK // layer.in_features // 32 * 32)
        for r0 in range(0, layer.out_features, rows):
            r1 = min(r0 + rows, layer.out_features)
            q = self._kernel_codes(layer, r0, r1)
            self.packed[r0:r1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)

    def _kernel_codes(self, layer, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of the codes as the kernel takes them: int32, shifted, columns in its order."""
        q = unpack(layer.stored_qweight()[r0:r1], layer.bits, layer.in_features).to(torch.int32)
        q += self.shift[r0:r1, self.shift_cols].to(torch.int32)
        return q if self.perm is None else q[:, self.perm]

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Shifted codes q + shift of rows r0..r1 (multiples of 32), columns in the kernel's order: (rows, in) uint8."""
        blocks = self.packed.view(-1, self.in_features, 16)[r0 // 32: r1 // 32]
        halves = torch.stack((blocks & 15, blocks >> 4), dim=1)  # (blocks, 2, in, 16)
        return halves.transpose(2, 3).reshape(r1 - r0, self.in_features)

    def codes(self) -> torch.Tensor:
        """The layer's stored codes (out, in) uint8, exactly: the packing undone."""
        q = self.rows(0, self.packed.shape[0])
        shift = self.shift[:, self.shift_cols]
        if self.perm is None:
            return q - shift
        codes = torch.empty_like(q)
        codes[:, self.perm] = q - shift[:, self.perm]
        return codes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        xb = x.to(torch.bfloat16).contiguous()
        op = torch.ops.aten._weight_int4pack_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        return op(xb, self.packed, self.group, self.scales_and_zeros).to(x.dtype)
