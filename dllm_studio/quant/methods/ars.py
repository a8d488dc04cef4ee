"""LRQ-DiT (arXiv:2508.03485) on a dLLM: twin-log weights and the adaptive rotation scheme (ARS).

ARS measures each linear's input fluctuation on the calibration tokens: a mild input (below the threshold)
gets a Hadamard rotation, which spreads its mild outliers cheaply; an input with salient ones gets DuQuant's
outlier-aware rotation (smoothing, block rotation, zigzag, rotation). LRQ-DiT's statistic is the input's RMS,
J = ||X||_F / sqrt(numel) (`rotation.fluctuation`), with a threshold set on DiT activations. An LLM's layers
differ in scale far more than in outliers (on the demo, attention outputs with no outliers have J ≈ 2 while
q's input, kurtosis 16, has J ≈ 0.5), so here J is measured in units of the input's median channel RMS: ≈ 1
without outlier channels at any scale, larger as a few channels dominate. At the threshold of 2 the RMS is
twice the median channel's; on the demo's masked calibration that sends 10 of 28 layers to the outlier-aware
rotation, and 24 of 28 once outliers are planted (`quant.planted`). LRQ-DiT reports about 5 % of a DiT's layers taking it.
"""

from __future__ import annotations

import torch

from dllm_studio.quant import rotation
from dllm_studio.quant.capture import transform_linear
from dllm_studio.quant.methods.duquant import outlier_transform, rotation_bytes, shared_inputs
from dllm_studio.quant.methods.tlq import TwinLog
from dllm_studio.quant.transforms import InputTransform

THRESHOLD = 2.0  # relative J at or above it takes the outlier-aware rotation
ALPHA = 0.5  # smoothing before the outlier-aware rotation, as LRQ-DiT's configs


def relative_fluctuation(x: torch.Tensor) -> float:
    """LRQ-DiT's J over the median channel RMS of x (tokens, in): scale-free."""
    channel_rms = x.float().pow(2).mean(0).sqrt()
    return rotation.fluctuation(x) / float(channel_rms.median().clamp_min(1e-12))


class ARS(TwinLog):  # its rounding is twin-log's
    @classmethod
    def working_bytes(cls, model, layers):
        return rotation_bytes(layers)  # at most: every layer might take the outlier-aware rotation

    def __init__(self, model, recipe, cancel=None):
        super().__init__(model, recipe, cancel)
        self.choices: dict[str, tuple[str, str]] = {}

    def prepare_block(self, block, taps):
        self.choices = {}
        for group in shared_inputs(block):  # linears reading one input share its choice and its transform
            self.cancel.check()
            x = taps[group[0]].inputs()
            j = relative_fluctuation(x)
            if j < THRESHOLD:
                transform = InputTransform(x.shape[-1], hadamard=rotation.hadamard_factor(x.shape[-1]))
                choice = ("Hadamard", f"J = {j:.3g} < {THRESHOLD:g}")
            else:
                transform = outlier_transform(x, [block.module.get_submodule(n).weight for n in group], ALPHA,
                                              self.cancel)
                choice = ("outlier-aware rotation (DuQuant)", f"J = {j:.3g} ≥ {THRESHOLD:g}")
            for name in group:
                self.choices[name] = choice
                transform_linear(block.module, name, transform)

    def transform_label(self, name):
        return self.choices[name]


METHOD = ARS
