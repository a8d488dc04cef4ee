"""LRQ-DiT's twin-log quantization (TLQ, arXiv:2508.03485) of the weights, activations left in 16 bits.

Weights are Gaussian-like with long tails, which a uniform grid serves badly: most of its levels sit where
few weights are. TLQ gives positive and negative weights separate log2 grids per row, with the offset η and
each side's clip percentile searched for the smallest error (`quant.twin_log`). Its levels are not uniform,
so each row stores them as a codebook its codes index (`QuantLinear.from_codebook`): decoding is exact.
"""

from dllm_studio.quant.methods.base import Method
from dllm_studio.quant.twin_log import twin_log


class TwinLog(Method):
    def round(self, linear, layer, tap):
        codes, codebook = twin_log(linear.weight.detach().float(), self.recipe.wbits, cancel=self.cancel)
        return self.codebook_linear(linear, codes, codebook)


METHOD = TwinLog
