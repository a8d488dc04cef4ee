"""AWQ as a method: per block, channel scales searched on the full-precision inputs and folded exactly into
each stage's producer, then every linear rounded with its searched clip. The searches are `quant.awq`."""

import torch

from dllm_studio.quant import awq
from dllm_studio.quant.grid import rtn
from dllm_studio.quant.capture import SAMPLE_TOKENS
from dllm_studio.quant.methods.base import Method, by_rows, fold_scales, scale_groups, stage_of


class AWQ(Method):
    @classmethod
    def working_bytes(cls, model, layers):
        # The scale search keeps the fp32 outputs of every linear one scale feeds on the sampled inputs: on an 8B's
        # MLP input, gate's and up's 2 x 12288 columns of 4096 rows (0.4 GB).
        widths: dict[tuple, int] = {}
        for layer in layers:
            key = layer.block, stage_of(layer)
            widths[key] = widths.get(key, 0) + layer.out_features
        return {"AWQ's reference outputs": SAMPLE_TOKENS * max(widths.values(), default=0) * 4}

    def search_cost(self, layers, rows):  # every alpha scales, rounds and re-evaluates each stage's linears
        return len(awq.ALPHAS) * super().search_cost(layers, rows)

    def round_cost(self, layer, rows):  # with a clip search: every shrink re-evaluates the layer on its tokens
        clip = 0 if layer.role in awq.NO_CLIP_ROLES else len(awq.CLIP_SHRINKS) * min(rows, awq.CLIP_TOKENS)
        return (1 + clip) * super().round_cost(layer, rows)

    def prepare_block(self, block, taps):
        for producer, consumers, readers in scale_groups(self.model, block):
            s = awq.search_scale(taps[readers[0]].inputs(), [c.weight for c in consumers], self.grid, self.group_size,
                                 cancel=self.cancel)
            fold_scales(producer, consumers, s)

    def round(self, linear, layer, tap):
        if tap is None or layer.role in awq.NO_CLIP_ROLES:
            return super().round(linear, layer, tap)
        w = linear.weight.detach()
        clip = awq.search_clip(tap.inputs(), w, self.grid, self.group_size,
                               torch.Generator(w.device).manual_seed(self.recipe.seed), cancel=self.cancel)
        return self.quant_linear(linear, *by_rows(lambda rows, shrink: rtn(rows.float(), self.grid, self.group_size,
                                                                           shrink), w, clip))


METHOD = AWQ
