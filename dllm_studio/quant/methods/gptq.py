"""GPTQ as a method: stage by stage through each block, every linear rounded with its inputs' Hessian.

The solver is `quant.gptq` (QuaRot rounds its rotated weights with it too).
"""

from dllm_studio.quant.gptq import gptq, solver_cost
from dllm_studio.quant.methods.base import STAGES, Method


class GPTQ(Method):
    hessian = True
    stages = STAGES

    def round_cost(self, layer, rows):
        return solver_cost(layer.in_features, layer.out_features)

    def round(self, linear, layer, tap):
        if tap is None:  # the LM head: no inputs to weigh the rounding with
            return super().round(linear, layer, tap)
        # The tap's Hessian is not read after the rounding: the solver takes it over and factors it in place.
        q, scales, zeros, g_idx = gptq(linear.weight, tap.hessian.take(), self.grid, self.group_size,
                                       damp=self.recipe.damp, act_order=self.recipe.act_order, consume=True,
                                       cancel=self.cancel)
        return self.quant_linear(linear, q, scales, zeros, g_idx=g_idx)


METHOD = GPTQ
