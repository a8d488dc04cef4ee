"""A library runtime (bitsandbytes, optimum-quanto, torchao) as a method: the library's own rounding and
module for each linear, given the layer's calibration inputs for its activation scales (`quant.runtimes`)."""

from dllm_studio.quant import runtimes
from dllm_studio.quant.methods.base import Method


class Library(Method):
    def round(self, linear, layer, tap):
        return runtimes.convert(linear, self.recipe, None if tap is None else tap.inputs())


METHOD = Library
