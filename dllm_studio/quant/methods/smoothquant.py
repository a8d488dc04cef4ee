"""SmoothQuant (Xiao et al., arXiv:2211.10438): move activation outliers into the weights, then W8A8.

Per input channel j of each group of linears reading one producer, s_j = max|X_j|^α / max|W_:,j|^(1-α), with
the weight maximum over every consumer. X / s is folded exactly into the producer (the norm's gain or the
rows of the linear before) and W·diag(s) into the consumers, so the full-precision block is unchanged while
the activations' channels even out: α = 0 leaves them, α = 1 moves all of their range into the weights.
A stage whose producer cannot take the fold (v → o under grouped-query attention) is left unsmoothed.
"""

from dllm_studio.quant.methods.base import Method, fold_scales, scale_groups, smoothing


class SmoothQuant(Method):
    def __init__(self, model, recipe, cancel=None):
        super().__init__(model, recipe, cancel)
        self.smoothed: dict[str, str] = {}  # the block's linears (local names) -> the producer their scales went into

    def prepare_block(self, block, taps):
        alpha, self.smoothed = self.recipe.migration, {}
        producers = {id(m): n for n, m in block.module.named_modules()}
        for producer, consumers, readers in scale_groups(self.model, block):
            fold_scales(producer, consumers, smoothing(taps[readers[0]].stats.absmax, [c.weight for c in consumers], alpha))
            consumer_ids = {id(c) for c in consumers}
            for name in block.layers:
                if id(block.module.get_submodule(name)) in consumer_ids:
                    self.smoothed[name] = producers[id(producer)]

    def transform_label(self, name):
        producer = self.smoothed.get(name)
        if producer is None:
            return "none", "no producer takes the scales exactly (e.g. v → o under grouped-query attention)"
        return f"smoothing α={self.recipe.migration:g}", f"folded into {producer}"


METHOD = SmoothQuant
