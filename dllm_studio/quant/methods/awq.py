"""AWQ as a method: per block, channel scales searched on the full-precision inputs and folded exactly into
each stage's producer, then every linear rounded with its searched clip. The searches are `quant.awq`."""

import torch

from dllm_studio.quant import awq
from dllm_studio.quant.grid import rtn
from dllm_studio.quant.methods.base import Method, fold_scales, scale_groups


class AWQ(Method):
    def prepare_block(self, block, taps):
        for producer, consumers, readers in scale_groups(self.model, block):
            s = awq.search_scale(taps[readers[0]].inputs(), [c.weight for c in consumers], self.grid, self.group_size,
                                 cancel=self.cancel)
            fold_scales(producer, consumers, s)

    def round(self, linear, layer, tap):
        if tap is None or layer.role in awq.NO_CLIP_ROLES:
            return super().round(linear, layer, tap)
        w = linear.weight.detach().float()
        clip = awq.search_clip(tap.inputs(), w, self.grid, self.group_size,
                               torch.Generator(w.device).manual_seed(self.recipe.seed), cancel=self.cancel)
        return self.quant_linear(linear, *rtn(w, self.grid, self.group_size, clip))


METHOD = AWQ
