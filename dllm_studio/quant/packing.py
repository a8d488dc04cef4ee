"""Bit packing: b-bit integers stored b bits apiece, as one little-endian bit stream.

Eight 3-bit values take three bytes, two 4-bit values one byte, four 2-bit values one byte. The GPTQ
checkpoint format packs the same little-endian stream into int32 words (its 3-bit layout, with values
crossing word boundaries, is exactly this stream), so the GPTQ writer reuses these bytes.
"""

from __future__ import annotations

from math import gcd

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _chunk(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest whole-byte chunk of `bits`-bit values."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit values (supported: {SUPPORTED_BITS})")
    values = 8 // gcd(8, bits)
    return values, values * bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` values of `bits` bits take (the last chunk padded with zeros)."""
    values, nbytes = _chunk(bits)
    return -(-n // values) * nbytes


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integers in [0, 2**bits) -> (..., packed_size(n, bits)) uint8, packed along the last dim."""
    values_per, nbytes = _chunk(bits)
    *lead, n = values.shape
    v = torch.nn.functional.pad(values.to(torch.int32), (0, -n % values_per))
    v = v.view(*lead, -1, values_per)
    shifts = torch.arange(values_per, dtype=torch.int32, device=values.device) * bits
    words = (v << shifts).sum(-1, dtype=torch.int32)  # at most 24 bits per chunk, so int32 holds it
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=values.device) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: (..., bytes) uint8 -> (..., n) uint8 values."""
    values_per, nbytes = _chunk(bits)
    *lead, size = packed.shape
    if bits == 8:
        return packed[..., :n]
    if nbytes == 1:  # 2 and 4 bits: one shift per slot, staying in uint8 (faster than a broadcast shift)
        mask = (1 << bits) - 1
        values = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)
        return values.reshape(*lead, -1)[..., :n]
    chunks = packed.view(*lead, size // nbytes, nbytes).to(torch.int32)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8
    words = (chunks << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(values_per, dtype=torch.int32, device=packed.device) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.to(torch.uint8).reshape(*lead, -1)[..., :n]
