"""Dequantize-then-matmul, a tile of output rows at a time: the kernel every layer can run.

A tile of rows is unpacked and scaled (or, for a codebook layer, looked up in its rows' codebooks) into
one reusable buffer, multiplied, and overwritten by the next tile, so a call never holds a float copy of the
whole weight (at 4096 x 4096 that copy alone is 64 MB written and read again per call; a 1M-element tile
stays in cache). Output rows are written straight
into a (out, tokens) result, whose row slices are contiguous, then transposed once.
"""

from __future__ import annotations

import torch

from dllm_studio.quant.kernels.base import Kernel, fake_quantize_activations
from dllm_studio.quant.packing import unpack

TILE_ELEMENTS = 1 << 20  # weights dequantized per tile: 4 MB at fp32, measured best on 4096-wide layers

_buffers: dict[tuple, torch.Tensor] = {}  # one tile buffer per (rows, in, dtype, device), shared by layers


def _buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (rows, cols, dtype, device)
    if key not in _buffers:
        # A normal tensor even when first asked for inside inference_mode (a model's forward): an inference
        # tensor could not be written by a later call outside it (the quantizer's, under no_grad).
        with torch.inference_mode(False):
            _buffers[key] = torch.empty(rows, cols, dtype=dtype, device=device)
    return _buffers[key]


class Dequant(Kernel):
    name = "dequant"
    label = "dequantize tiles + dense matmul"

    @classmethod
    def unsupported(cls, layer, device: torch.device) -> str | None:
        return None

    def __init__(self, layer) -> None:
        self.layer = layer
        self.rows = max(16, min(layer.out_features, TILE_ELEMENTS // layer.in_features))
        self.perm = None
        # Where another kernel holds the codes (`QuantLinear.release_codes`), tiles are read from its layout:
        # shifted codes in its column order, in blocks of 32 rows.
        self.source = layer.codes_source
        if self.source is not None:
            self.rows = max(32, self.rows // 32 * 32)
            self.perm = self.source.perm
        elif layer.g_idx is not None:
            # Act-order groups are scattered over the columns; sorted by group they are contiguous runs of
            # `group_size` (how GPTQ assigns them), so permuting the input once per call lets every tile
            # use a reshape instead of gathering a scale for every weight.
            order = torch.argsort(layer.g_idx.long(), stable=True)
            sizes = torch.bincount(layer.g_idx.long(), minlength=layer.groups)
            if bool((sizes[:-1] == layer.group_size).all()) and int(sizes[-1]) <= layer.group_size:
                self.perm = order
        # Unpacked once here, not per call: the zero points (shifted where the int4 layout shifted the codes),
        # and for irregular act-order groups each column's group.
        self.zeros = None if layer.codebook is not None else (
            layer.zeros() if self.source is None else layer.zeros() + self.source.shift)
        self.cols = layer.g_idx.long() if layer.g_idx is not None and self.perm is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.act_bits < 16:  # WxA8/WxA4 numerics, simulated: the activations are rounded per token first
            x = fake_quantize_activations(x, layer.act_bits, layer.act_clip)
        cols, zeros = self.cols, self.zeros
        if self.perm is not None:
            x = x[:, self.perm]
        out = torch.empty(layer.out_features, x.shape[0], dtype=x.dtype, device=x.device)
        buf = _buffer(self.rows, layer.in_features, x.dtype, x.device)
        for r0 in range(0, layer.out_features, self.rows):
            r1 = min(r0 + self.rows, layer.out_features)
            w = buf[: r1 - r0]
            self._dequantize_rows(r0, r1, zeros, cols, w)
            torch.mm(w, x.T, out=out[r0:r1])
        return out.T

    def _dequantize_rows(self, r0, r1, zeros, cols, w) -> None:
        layer = self.layer
        if layer.codebook is not None:  # codes index their row's codebook: one gather into the tile
            torch.gather(layer.codebook[r0:r1].to(w.dtype), 1, _codes(layer, r0, r1).long(), out=w)
            return
        scales = layer.scales[r0:r1].to(w.dtype)
        offsets = -zeros[r0:r1].to(w.dtype) * scales
        size = layer.group_size
        fast = cols is None and self.perm is None and self.source is None
        if fast and layer.in_features % size == 0 and layer.bits in (2, 4):
            # Straight from the packed bytes: one fused multiply-add per slot of the byte, written to every
            # (8 / bits)-th weight, instead of unpacking the codes into a temporary first (2x faster).
            per_byte, mask = 8 // layer.bits, (1 << layer.bits) - 1
            packed = layer.qweight[r0:r1].view(r1 - r0, layer.groups, size // per_byte)
            slots = w.view(r1 - r0, layer.groups, size // per_byte, per_byte)
            for slot in range(per_byte):
                torch.addcmul(offsets[..., None], (packed >> slot * layer.bits) & mask, scales[..., None],
                              out=slots[..., slot])
            return
        if self.source is not None and layer.in_features % size == 0:
            # Straight from the int4 layout: byte (block, column, j) holds rows 32 block + j (low nibble) and
            # 32 block + 16 + j (high); one fused multiply-add per nibble writes them in place.
            blocks = self.source.packed.view(-1, layer.groups, size, 16)[r0 // 32: r1 // 32]
            tile = w.view(-1, 2, 16, layer.groups, size)
            s, o = (t.view(-1, 2, 16, layer.groups).permute(0, 1, 3, 2)[..., None, :] for t in (scales, offsets))
            for half, nibble in enumerate((blocks & 15, blocks >> 4)):
                torch.addcmul(o[:, half], nibble, s[:, half], out=tile[:, half].permute(0, 2, 3, 1))
            return
        if self.source is not None:
            q = self.source.rows(r0, r1)  # already in the permuted column order
        else:
            q = _codes(layer, r0, r1)
            if self.perm is not None:
                q = q[:, self.perm]
        if cols is not None:  # irregular groups: one scale per weight
            torch.addcmul(offsets[:, cols], q, scales[:, cols], out=w)
            return
        if layer.in_features % size == 0:
            shape = (r1 - r0, layer.groups, size)
            torch.addcmul(offsets[..., None], q.view(shape), scales[..., None], out=w.view(shape))
            return
        full = layer.in_features // size * size  # a last, shorter group
        head = (r1 - r0, full // size, size)
        torch.addcmul(offsets[:, :-1, None], q[:, :full].reshape(head), scales[:, :-1, None], out=w[:, :full].view(head))
        torch.addcmul(offsets[:, -1:], q[:, full:], scales[:, -1:], out=w[:, full:])


def _codes(layer, r0: int, r1: int) -> torch.Tensor:
    """Codes of rows r0..r1 as uint8 (rows, in); 4 and 2 bits with one shift per slot, the rest via `unpack`."""
    packed = layer.qweight[r0:r1]
    if layer.bits == 8:
        return packed
    if layer.bits == 4 and layer.in_features % 2 == 0:
        return torch.stack((packed & 15, packed >> 4), dim=-1).view(r1 - r0, -1)
    return unpack(packed, layer.bits, layer.in_features)
