"""A quantization recipe: every setting that decides the result, saved beside it (recipe.json)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from dllm_studio.errors import QuantizationError
from dllm_studio.quant import runtimes
from dllm_studio.quant.methods import METHODS as SPECS

# Importable without torch, so the CLI's --help stays fast.
FORMATS = ("native", "gptq")
# How masked calibration spreads its masks (`quant.calibration`): today's ratios over (0, 1), or the sampler's steps.
CALIB_MASKINGS = {"stratified": "mask ratios stratified over (0, 1)",
                  "timesteps": "masked as the sampler's input before its steps, stratified over the steps"}
# Read from the one method table (`quant.methods`): ours first, then the library runtimes (optional extras;
# `runtimes.unavailable` says when one cannot run).
METHODS = {name: spec.description for name, spec in SPECS.items()}
WEIGHT_BITS = {name: spec.weight_bits for name, spec in SPECS.items()}
ACTIVATION_BITS = {name: spec.activation_bits for name, spec in SPECS.items()}
WEIGHT_ACTIVATION = tuple(name for name, spec in SPECS.items() if spec.layout != "library" and spec.activation_bits != (16,))
# Methods whose layers may each take their own bits (a memory-budget plan, `quant.budget`): weight-only rounding
# onto the integer grid, one layer at a time. Rotations and smoothing tie a layer's grid to its neighbours',
# codebooks are sized per bit-width, and the libraries choose their own layouts.
MIXED_BITS_METHODS = ("rtn", "gptq", "awq")


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
    masked_calib: bool = True  # mask calibration tokens as denoising sees them (False: clean text)
    calib_masking: str = "stratified"  # one of CALIB_MASKINGS: how the masks are spread
    # "timesteps": the sampler's step count whose schedule the masks follow; None: GenerationConfig's default.
    calib_steps: int | None = None
    skip: tuple[str, ...] = ("head",)  # roles or glob patterns of linear names left in full precision
    seed: int = 0
    alpha: float | None = None  # SmoothQuant/DuQuant migration strength; None: the method's default
    clip: float | None = None  # activation clip ratio (scale = clip * max|x| per token); None: the method's default
    # Mixed precision (`quant.budget`): (layer name, bits) per planned layer; layers not listed take `wbits`, which
    # is also the most a plan gives. The budget the plan was made for is kept too, for the record only.
    layer_bits: tuple[tuple[str, int], ...] = ()
    memory_budget: int | None = None  # bytes of the whole model's weights as stored
    target_bpw: float | None = None  # stored bits per quantized weight (scales and zero points included)

    def validate(self) -> QuantRecipe:
        """Refuse combinations that cannot work, before any model is touched."""
        spec = SPECS.get(self.method)
        if spec is None:
            raise QuantizationError(f"Unknown method {self.method!r}; choose one of {', '.join(SPECS)}.")
        name = self.method.upper()
        if self.wbits not in spec.weight_bits:
            bits = ", ".join(map(str, spec.weight_bits))
            raise QuantizationError(f"{name} quantizes weights to {bits} bits, not {self.wbits}.")
        if self.method in runtimes.METHODS:
            self._validate_runtime()
        elif spec.activation_bits == (16,) and self.abits != 16:
            raise QuantizationError(
                f"{name} is weight-only: activations stay 16-bit (A16), so --abits {self.abits} cannot apply; "
                f"the weight-and-activation methods are {', '.join(WEIGHT_ACTIVATION)}.")
        elif (self.wbits, self.abits) not in spec.settings:
            settings = ", ".join(f"W{w}A{a}" for w, a in spec.settings)
            raise QuantizationError(f"{name} produces {settings}; W{self.wbits}A{self.abits} is not one of them "
                                    "(--wbits, --abits).")
        self._validate_options(spec)
        self._validate_mixed(spec)
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise QuantizationError(f"Group size {self.group_size} must be a multiple of 8 (or 0 for per-channel).")
        if self.act_order and "act_order" not in self.spec.options:
            raise QuantizationError(f"Act-order is a GPTQ option; {self.method.upper()} quantizes columns in its own order.")
        # RTN needs no calibration to round, but every method runs the calibration inputs through the
        # model for the live profile and the per-layer error report.
        if self.calib_samples < 1:
            raise QuantizationError(f"Quantizing needs at least one calibration sample (got {self.calib_samples}).")
        if self.seq_len < 8:
            raise QuantizationError(f"Calibration sequences of {self.seq_len} tokens are too short (at least 8).")
        self._validate_masking()
        if not 0 < self.damp < 1:
            raise QuantizationError(f"GPTQ dampening must lie in (0, 1), got {self.damp}.")
        return self

    def _validate_masking(self) -> None:
        if self.calib_masking not in CALIB_MASKINGS:
            raise QuantizationError(f"Unknown calibration masking {self.calib_masking!r}; choose one of "
                                    f"{', '.join(CALIB_MASKINGS)}.")
        if self.calib_steps is not None and self.calib_masking != "timesteps":
            raise QuantizationError("--calib-steps sets the sampler schedule of timestep masking; "
                                    f"{self.calib_masking} masking has none (use --calib-masking timesteps).")
        if self.calib_steps is not None and self.calib_steps < 1:
            raise QuantizationError(f"Timestep masking needs at least one sampler step (got {self.calib_steps}).")

    def _validate_options(self, spec) -> None:
        """The options a method reads beyond the bits, and the grid settings its layout leaves no room for."""
        name = self.method.upper()
        if self.alpha is not None:
            if "alpha" not in spec.options:
                raise QuantizationError(f"--alpha is the migration strength of SmoothQuant and DuQuant; {name} has none.")
            if not 0 <= self.alpha <= 1:
                raise QuantizationError(f"--alpha must lie in [0, 1] (0: no migration, 1: all of it), got {self.alpha}.")
        if self.clip is not None:
            if not spec.reads_clip(self.abits):
                raise QuantizationError(f"--clip is the activation clip ratio; {name} W{self.wbits}A{self.abits} "
                                        "quantizes no activations it would apply to.")
            if not 0 < self.clip <= 1:
                raise QuantizationError(f"--clip must lie in (0, 1] (1: the full per-token range), got {self.clip}.")
        if spec.layout == "library":
            return
        fixed = spec.fixed_grid(self.wbits, self.abits)
        if fixed and self.group_size != QuantRecipe.group_size:
            raise QuantizationError(f"{name} W{self.wbits}A{self.abits} rounds weights with {fixed}; "
                                    f"--group-size {self.group_size or 0} does not apply (leave the default).")
        if fixed and self.symmetric and spec.layout == "codebook":
            raise QuantizationError(f"{name} rounds weights onto twin log grids, not a symmetric one; --sym does not apply.")

    def _validate_mixed(self, spec) -> None:
        if not (self.layer_bits or self.memory_budget is not None or self.target_bpw is not None):
            return
        self.check_mixed_bits()
        if self.memory_budget is not None and self.target_bpw is not None:
            raise QuantizationError("Give a memory budget or a target bits per weight, not both.")
        if self.memory_budget is not None and (type(self.memory_budget) is not int or self.memory_budget <= 0):
            raise QuantizationError(f"The memory budget must be a positive number of bytes, not {self.memory_budget!r}.")
        if self.target_bpw is not None and not self.target_bpw > 0:
            raise QuantizationError(f"The target bits per weight must be positive, not {self.target_bpw!r}.")
        for layer, bits in self.layer_bits:
            if type(bits) is not int or bits not in spec.weight_bits:
                raise QuantizationError(f"The bit plan gives {layer} {bits!r} bits; {self.method.upper()} quantizes "
                                        f"weights to {', '.join(map(str, spec.weight_bits))} bits.")

    def check_mixed_bits(self) -> None:
        """Refuse a method and setting whose layers cannot each take their own bits."""
        if self.method not in MIXED_BITS_METHODS or self.abits != 16:
            raise QuantizationError(
                f"Mixed precision (--memory-budget, --target-bpw) gives each layer its own weight bits, which only the "
                f"weight-only grid methods ({', '.join(MIXED_BITS_METHODS)}, at A16) can take; {self.method.upper()} "
                f"W{self.wbits}A{self.abits} ties every layer to one grid.")

    def bits_of(self, name: str) -> int:
        """The weight bits of the linear `name`: its plan's, or the recipe's."""
        return dict(self.layer_bits).get(name, self.wbits)

    @property
    def mixed(self) -> bool:
        """Whether some layer is planned at bits other than `wbits` (one `bits` no longer describes the model)."""
        return any(bits != self.wbits for _, bits in self.layer_bits)

    @property
    def spec(self):
        return SPECS[self.method]

    @property
    def per_channel(self) -> bool:
        """Weights rounded with one symmetric scale per output channel, whatever `group_size` says (W-A settings)."""
        return self.abits < 16 and self.spec.layout == "grid"

    @property
    def activation_clip(self) -> float:
        return self.spec.default_clip(self.abits) if self.clip is None else self.clip

    @property
    def migration(self) -> float | None:
        return self.spec.alpha if self.alpha is None else self.alpha

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
        if self.spec.layout == "codebook":
            return f"{self.method.upper()} W{self.wbits}A{self.abits} per-row codebook"
        if self.per_channel:
            return f"{self.method.upper()} W{self.wbits}A{self.abits} per-channel sym"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        bits = sorted({self.wbits, *(b for _, b in self.layer_bits)})
        weights = f"W{bits[0]}-{bits[-1]}A{self.abits} mixed" if self.mixed else f"W{self.wbits}A{self.abits}"
        return f"{self.method.upper()} {weights} {group}{' sym' if self.symmetric else ''}"

    def to_dict(self) -> dict:
        raw = {**dataclasses.asdict(self), "skip": list(self.skip), "layer_bits": dict(self.layer_bits)}
        # A uniform recipe reads as it did before plans existed (older readers, the study's cached results' keys).
        return {k: v for k, v in raw.items() if k not in ("layer_bits", "memory_budget", "target_bpw") or v}

    @classmethod
    def from_dict(cls, raw: dict) -> QuantRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise QuantizationError(f"Unknown recipe setting(s): {', '.join(unknown)}.")
        fields = {**raw, **({"skip": tuple(raw["skip"])} if "skip" in raw else {})}
        if "layer_bits" in raw:  # a JSON object {layer: bits}, held as sorted pairs so the recipe stays hashable
            fields["layer_bits"] = tuple(sorted(dict(raw["layer_bits"]).items()))
        return cls(**fields)
