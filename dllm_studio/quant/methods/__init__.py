"""Every quantization method, in the one table the CLI, the GUI pickers, recipe validation and the docs read.

A row (`Spec`) says what the method is, which weight/activation bit pairs it produces and which recipe
options it reads; its behaviour is one module here (`rtn.py`, `gptq.py`, …) holding a `Method` subclass
(see `base.py`), imported only when the method runs, so this table, the recipe and the CLI's --help stay
importable without torch. Library runtimes (bitsandbytes, optimum-quanto, torchao) are rows too, run by
`library.py`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dllm_studio.quant import runtimes

# How a method lays out its weights: on the integer grid ("grid": the recipe's group size and symmetry for
# weight-only settings; one symmetric scale per output channel once activations are quantized too, which is
# what integer-activation kernels take), as per-row codebooks of non-uniform levels ("codebook"), or as the
# library's own layout ("library").
LAYOUTS = ("grid", "codebook", "library")
# Which tensors a weight-and-activation setting rounds (`QuantLinear.act_bits`), as every report states it.
QUANTIZED_TENSORS = ("activations quantized: the inputs of every block linear (q, k, v, o, gate, up, down); "
                     "attention's queries, keys, values and softmax stay in full precision")


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    settings: tuple[tuple[int, int], ...]  # (weight bits, activation bits) pairs it produces
    module: str  # its implementation under dllm_studio.quant.methods
    layout: str = "grid"
    options: tuple[str, ...] = ()  # recipe options it reads beyond the bits: "act_order", "alpha", "clip"
    alpha: float | None = None  # default migration strength (SmoothQuant, DuQuant)
    clip: float = 1.0  # default activation clip ratio at 4-bit activations (`default_clip`)
    studied: tuple[str, ...] = ()  # settings the seed study (arXiv:2508.14896) ran, e.g. "W4A16"; others are beyond it
    transforms: bool = False  # changes the linears' inputs before rounding: LayerTransformed events report them

    @property
    def weight_bits(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(w for w, _ in self.settings))

    @property
    def activation_bits(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(a for _, a in self.settings))

    def default_clip(self, abits: int) -> float:
        """The activation clip ratio a setting gets unless the recipe says: the method's at 4-bit activations
        (DuQuant's 0.9 is its W4A4 setting), the full range at 8 bits, where 255 levels round finer than
        clipping saves (DuQuant W8A8 on the demo: mean layer error 0.0039 at 1.0, 0.0141 at 0.9)."""
        return self.clip if abits <= 4 else 1.0

    def reads_clip(self, abits: int) -> bool:
        """Whether `--clip` applies: the method clips activations, and the setting quantizes them."""
        return "clip" in self.options and abits < 16

    def fixed_grid(self, wbits: int, abits: int) -> str | None:
        """How the setting lays out its weights when the recipe's group size and symmetry do not apply (the
        library's layout, a codebook per row, or one symmetric scale per output channel), None when they do."""
        if self.layout == "library":
            return f"{self.name}'s own layout ({runtimes.layout(self.name, wbits)})"
        if self.layout == "codebook":
            return "a codebook of levels per output row"
        if abits < 16:
            return "one symmetric scale per output channel (what integer-activation kernels take)"
        return None

    def setting_label(self, wbits: int, abits: int) -> str:
        label = f"W{wbits}A{abits}"
        return label if not self.studied or label in self.studied else f"{label} (beyond the seed study)"

    def implementation(self):
        """The `Method` subclass that runs it."""
        return importlib.import_module(f"{__name__}.{self.module}").METHOD


# Which tensors a weight-and-activation setting rounds, said wherever one is chosen or reported.
QUANTIZED_TENSORS = ("activations quantized: the inputs of every block linear (q, k, v, o, gate, up, down), per token; "
                     "attention's queries, keys, values and softmax stay in full precision")

WEIGHT_ONLY = tuple((w, 16) for w in (8, 4, 3, 2))
WA = ((8, 8), (4, 8), (4, 4))

_OWN = (
    Spec("rtn", "round-to-nearest, no calibration", WEIGHT_ONLY + WA, "rtn", options=("clip",)),
    Spec("gptq", "GPTQ: Hessian-aware rounding with error feedback (arXiv:2210.17323)", WEIGHT_ONLY, "gptq",
         options=("act_order",), studied=("W4A16", "W3A16")),
    Spec("awq", "AWQ: activation-aware channel scaling and clipping (arXiv:2306.00978)", WEIGHT_ONLY, "awq",
         studied=("W4A16", "W3A16")),
    Spec("smoothquant", "SmoothQuant: outliers migrated from activations into weights by per-channel scales folded "
         "into the norm or linear before (arXiv:2211.10438)", WA, "smoothquant",
         options=("alpha", "clip"), alpha=0.5, studied=("W8A8", "W4A4"), transforms=True),
    Spec("quarot", "QuaRot: norms fused, residual stream rotated by a randomized Hadamard, online Hadamard before "
         "the down projection, then GPTQ weights (arXiv:2404.00456)", WA, "quarot",
         options=("clip",), studied=("W8A8", "W4A4"), transforms=True),
    Spec("duquant", "DuQuant: smoothing, block rotations, a zigzag permutation and a second rotation per layer, then "
         "clipped round-to-nearest (arXiv:2406.01721)", WA, "duquant",
         options=("alpha", "clip"), alpha=0.5, clip=0.9, studied=("W8A8", "W4A4"), transforms=True),
    Spec("tlq", "LRQ-DiT twin-log: separate log grids for positive and negative weights, per row, searched clip and "
         "offset (arXiv:2508.03485)", ((4, 16), (3, 16)), "tlq", layout="codebook"),
    Spec("ars", "LRQ-DiT: twin-log weights and the adaptive rotation scheme, Hadamard or the outlier-aware (DuQuant) "
         "rotation per layer by its activation fluctuation (arXiv:2508.03485)", ((4, 8), (4, 4), (3, 4)), "ars",
         layout="codebook", options=("clip",), transforms=True),
)
_LIBRARY = tuple(
    Spec(name, text, tuple((w, a) for w in runtimes.WEIGHT_BITS[name] for a in runtimes.ACTIVATION_BITS[name]),
         "library", layout="library")
    for name, text in runtimes.METHODS.items())

METHODS: dict[str, Spec] = {spec.name: spec for spec in (*_OWN, *_LIBRARY)}
