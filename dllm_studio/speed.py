"""A quantized model's speed and size next to full precision, in words a user can act on.

Weight-only quantization is a memory saving first: on CPUs a 4-bit layer usually runs slower than the dense
one (cpu-kernels.md), and the app says so with the reason instead of letting a slower pane look like a bug.
"""

from __future__ import annotations

from dllm_studio.hardware import cpu_units

WHY = {
    "dequant": "its layers dequantize their weights on every step; no faster kernel runs this grid here",
    "int4": "torch's int4 kernel reads 4-bit weights but computes in bf16",
    "int8": "torch's int8 weight-only kernel computes in bf16",
    "w8a8": "int8 x int8 products with per-token activation scales",
}


def simulated(kernels: dict[str, int]) -> bool:
    """Whether the kernel counts (`kernels.choices`/`ran`) include layers whose activation rounding is simulated."""
    from dllm_studio.quant.kernels import SIMULATED_NOTE

    return any(name.endswith(f" ({SIMULATED_NOTE})") for name in kernels)


def speed_note(label: str, fp_ms: float, q_ms: float, fp_bytes: int, q_bytes: int, kernels: dict[str, int],
               device: str = "cpu") -> str:
    """e.g. "W4 g128 runs int4 here: 1.4× slower than full precision, 3.8× smaller (torch's int4 kernel ...)"."""
    smaller = fp_bytes / q_bytes if q_bytes else 0.0
    size = f"{smaller:.1f}× smaller" if smaller >= 1 else f"{1 / smaller:.1f}× larger" if smaller else "size unknown"
    if not kernels:
        return f"{label}: {size}."
    from dllm_studio.quant.kernels import SIMULATED_NOTE  # (torch: imported where a quantized model ran)

    main = max(kernels, key=kernels.get)
    if main.endswith(f" ({SIMULATED_NOTE})"):  # `kernels.counted`: the quantized activations are rounded in floats
        return (f"{label} runs {main.removesuffix(f' ({SIMULATED_NOTE})')} here, {SIMULATED_NOTE}: its activations' "
                f"rounding is simulated in floating point to measure accuracy; {size}.")
    ratio = q_ms / fp_ms if fp_ms else 0.0
    if ratio > 1.05:
        speed = f"{ratio:.1f}× slower than full precision"
        why = WHY.get(main, main)
        if main in ("int4", "int8") and device == "cpu" and not cpu_units().fast_bf16:
            why += ", which this CPU runs without bf16 units"
    elif ratio < 0.95 and ratio:
        speed, why = f"{1 / ratio:.1f}× faster than full precision", WHY.get(main, main)
    else:
        speed, why = "as fast as full precision", WHY.get(main, main)
    return f"{label} runs {main} here: {speed}, {size} ({why})."
