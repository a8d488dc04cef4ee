"""What this machine computes fast: the CPU's vector and matrix units, and the floating-point dtype to run in.

On CPUs with AVX512-BF16 or AMX, bf16 matmuls run about 3x faster than fp32; on AVX2-only CPUs they run about
4x slower (cpu-kernels.md). GPUs run bf16 at full rate. So "auto" means bf16 there and fp32 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class CpuUnits:
    capability: str  # torch's dispatch level: DEFAULT, AVX2, AVX512, ...
    avx512_bf16: bool
    amx: bool
    vnni: bool  # int8 dot products (AVX512-VNNI / AMX-INT8): what makes int8 x int8 matmuls fast

    @property
    def fast_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def line(self) -> str:
        """One line for benchmarks and `info`, e.g. "CPU AVX2 (no bf16 or int8 matrix units), 2 threads"."""
        units = [name for name, has in (("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx),
                                         ("VNNI", self.vnni)) if has]
        extra = ", ".join(units) if units else "no bf16 or int8 matrix units"
        threads = torch.get_num_threads()
        return f"CPU {self.capability} ({extra}), {threads} thread{'s' * (threads != 1)}"


@cache
def cpu_units() -> CpuUnits:
    c = torch.cpu
    return CpuUnits(torch.backends.cpu.get_cpu_capability(), c._is_avx512_bf16_supported(),
                    c._is_amx_tile_supported(), c._is_vnni_supported() or c._is_amx_tile_supported())


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The floating-point dtype matmuls run fastest in on `device`."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_units().fast_bf16 else torch.float32


def fast_dtype_reason(device: str | torch.device = "cpu") -> str:
    """Why `fast_dtype` chose what it chose, for the Models page, `info` and the stats."""
    if torch.device(device).type != "cpu":
        return f"bfloat16: {torch.device(device).type.upper()} devices run bf16 at full rate"
    units = cpu_units()
    if units.fast_bf16:
        return f"bfloat16: this CPU has {'AMX' if units.amx else 'AVX512-BF16'}, bf16 matmuls beat fp32"
    return f"float32: this CPU ({units.capability}) has no bf16 units, bf16 matmuls would be ~4x slower"
