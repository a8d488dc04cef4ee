"""LRQ-DiT's twin-log quantization (TLQ, arXiv:2508.03485) of the weights, activations left in 16 bits.

Weights are Gaussian-like with long tails, which a uniform grid serves badly: most of its levels sit where
few weights are. TLQ gives positive and negative weights separate log2 grids per row, with the offset η and
each side's clip percentile searched for the smallest error (`quant.twin_log`). Its levels are not uniform,
so each row stores them as a codebook its codes index (`QuantLinear.from_codebook`): decoding is exact.
"""

from dllm_studio.quant import twin_log
from dllm_studio.quant.methods.base import Method


class TwinLog(Method):
    @classmethod
    def working_bytes(cls, model, layers):
        largest = max((l.in_features * l.out_features for l in layers), default=0)
        return {"twin-log search": min(largest, twin_log.CHUNK_ELEMENTS) * twin_log.SEARCH_BYTES}

    def round(self, linear, layer, tap):
        codes, codebook = twin_log.twin_log(linear.weight.detach().float(), self.recipe.wbits, cancel=self.cancel)
        return self.codebook_linear(linear, codes, codebook)


METHOD = TwinLog
