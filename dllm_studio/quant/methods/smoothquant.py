"""SmoothQuant (Xiao et al., arXiv:2211.10438): move activation outliers into the weights, then W8A8.

Per input channel j of each group of linears reading one producer, s_j = max|X_j|^α / max|W_:,j|^(1-α), with
the weight maximum over every consumer. X / s is folded exactly into the producer (the norm's gain or the
rows of the linear before) and W·diag(s) into the consumers, so the full-precision block is unchanged while
the activations' channels even out: α = 0 leaves them, α = 1 moves all of their range into the weights.
A stage whose producer cannot take the fold (v → o under grouped-query attention) is left unsmoothed.
"""

import torch

from dllm_studio.quant.methods.base import Method, fold_scales, scale_groups


class SmoothQuant(Method):
    def __init__(self, model, recipe):
        super().__init__(model, recipe)
        self.smoothed: dict[str, str] = {}  # local linear name -> the producer its scales were folded into

    def prepare_block(self, block, taps):
        alpha = self.recipe.migration
        producers = {id(m): n for n, m in block.module.named_modules()}
        for producer, consumers, readers in scale_groups(self.model, block):
            weight = torch.cat([c.weight.detach().abs().float() for c in consumers]).amax(0)
            act = taps[readers[0]].stats.absmax.to(weight.device)
            s = (act.clamp_min(1e-5).pow(alpha) / weight.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
            fold_scales(producer, consumers, s)
            consumer_ids = {id(c) for c in consumers}
            for name in block.layers:
                if id(block.module.get_submodule(name)) in consumer_ids:
                    self.smoothed[f"{block.index}.{name}"] = producers[id(producer)]
        self._block = block.index

    def transform_label(self, name):
        producer = self.smoothed.get(f"{self._block}.{name}")
        if producer is None:
            return "none", "no producer takes the scales exactly (e.g. v → o under grouped-query attention)"
        return f"smoothing α={self.recipe.migration:g}", f"folded into {producer}"


METHOD = SmoothQuant
