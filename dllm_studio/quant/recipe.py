"""A quantization recipe: every setting that decides the result, saved beside it (recipe.json)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from dllm_studio.errors import QuantizationError
from dllm_studio.quant import runtimes

# Importable without torch, so the CLI's --help stays fast.
FORMATS = ("native", "gptq")
OWN_METHODS = {
    "rtn": "round-to-nearest, no calibration",
    "gptq": "GPTQ: Hessian-aware rounding with error feedback (arXiv:2210.17323)",
    "awq": "AWQ: activation-aware channel scaling and clipping (arXiv:2306.00978)",
}
# Ours first, then the library runtimes (optional extras; `runtimes.unavailable` says when one cannot run).
METHODS = {**OWN_METHODS, **runtimes.METHODS}
WEIGHT_BITS = {"rtn": (8, 4, 3, 2), "gptq": (8, 4, 3, 2), "awq": (8, 4, 3, 2), **runtimes.WEIGHT_BITS}
ACTIVATION_BITS = {**{m: (16,) for m in OWN_METHODS}, **runtimes.ACTIVATION_BITS}


@dataclass(frozen=True)
class QuantRecipe:
    method: str = "gptq"
    wbits: int = 4
    abits: int = 16  # weight-only methods keep activations in floating point
    group_size: int | None = 128  # None: one scale per output channel
    symmetric: bool = False
    act_order: bool = False  # GPTQ only: sweep columns by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ dampening, as a fraction of the mean Hessian diagonal
    calib: str = "builtin"  # "builtin" (the demo task and text data) or a path to a UTF-8 text file
    calib_samples: int = 32
    seq_len: int = 256
    masked_calib: bool = True  # mask calibration tokens at ratios spread over (0, 1), as denoising sees them
    skip: tuple[str, ...] = ("head",)  # roles or glob patterns of linear names left in full precision
    seed: int = 0

    def validate(self) -> QuantRecipe:
        """Refuse combinations that cannot work, before any model is touched."""
        if self.method not in METHODS:
            raise QuantizationError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.wbits not in WEIGHT_BITS[self.method]:
            bits = ", ".join(map(str, WEIGHT_BITS[self.method]))
            raise QuantizationError(f"{self.method.upper()} quantizes weights to {bits} bits, not {self.wbits}.")
        if self.method in OWN_METHODS and self.abits != 16:
            raise QuantizationError(
                f"{self.method.upper()} is weight-only: activations stay 16-bit (A16), so --abits {self.abits} "
                "cannot apply; weight-activation methods (SmoothQuant, QuaRot) are not available yet.")
        if self.method in runtimes.METHODS:
            self._validate_runtime()
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise QuantizationError(f"Group size {self.group_size} must be a multiple of 8 (or 0 for per-channel).")
        if self.act_order and self.method != "gptq":
            raise QuantizationError("Act-order is a GPTQ option; RTN and AWQ quantize columns in their own order.")
        # RTN needs no calibration to round, but every method runs the calibration inputs through the
        # model for the live profile and the per-layer error report.
        if self.calib_samples < 1:
            raise QuantizationError(f"Quantizing needs at least one calibration sample (got {self.calib_samples}).")
        if self.seq_len < 8:
            raise QuantizationError(f"Calibration sequences of {self.seq_len} tokens are too short (at least 8).")
        if not 0 < self.damp < 1:
            raise QuantizationError(f"GPTQ dampening must lie in (0, 1), got {self.damp}.")
        return self

    def _validate_runtime(self) -> None:
        """A library method: its library is installed, and the settings it has no use for keep their defaults."""
        name = self.method
        reason = runtimes.unavailable(name)
        if reason:
            raise QuantizationError(f"{name} cannot run: {reason}.")
        if self.abits not in ACTIVATION_BITS[name]:
            allowed = " or ".join(map(str, ACTIVATION_BITS[name]))
            raise QuantizationError(f"{name} runs activations at {allowed} bits, not {self.abits} (--abits).")
        if self.abits == 8 and "head" not in self.skip:
            raise QuantizationError(f"{name} with int8 activations needs calibration inputs for every layer it "
                                    "quantizes, and the LM head's lie outside the blocks: keep the head in full "
                                    "precision (--skip head).")
        if self.symmetric:
            raise QuantizationError(f"{name} uses {runtimes.BY_METHOD[name].library}'s own grid; --sym does not apply.")
        if self.group_size != QuantRecipe.group_size:
            raise QuantizationError(f"{name} groups weights its own way ({runtimes.layout(name, self.wbits)}); "
                                    f"--group-size {self.group_size or 0} does not apply (leave the default).")

    def skips(self, name: str, role: str) -> bool:
        return any(p == role or fnmatch.fnmatchcase(name, p) for p in self.skip)

    @property
    def label(self) -> str:
        if self.method in runtimes.METHODS:
            return f"{self.method.upper()} W{self.wbits}A{self.abits} {runtimes.layout(self.method, self.wbits)}"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.method.upper()} W{self.wbits}A{self.abits} {group}{' sym' if self.symmetric else ''}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, raw: dict) -> QuantRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise QuantizationError(f"Unknown recipe setting(s): {', '.join(unknown)}.")
        return cls(**{**raw, **({"skip": tuple(raw["skip"])} if "skip" in raw else {})})
