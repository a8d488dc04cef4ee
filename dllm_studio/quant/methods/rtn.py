"""Round-to-nearest: every weight to its nearest grid point, no calibration (the baseline every method beats).

With activations quantized too (W8A8, W4A8, W4A4) it is the plain baseline of the weight-and-activation
methods: per-channel symmetric weights, per-token activations, nothing done about outliers.
"""

from dllm_studio.quant.methods.base import Method


class RTN(Method):
    pass  # `Method.round` is round-to-nearest


METHOD = RTN
