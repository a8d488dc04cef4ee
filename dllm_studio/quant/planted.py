"""Planted outliers: a copy of a model that computes exactly the same function, with outlier activations.

Real LLMs grow outlier features the same way: a norm gain or a producing linear's rows scale a few channels
up, and the weights reading them scale them back down. Here chosen channels of every block's norms (the inputs
of q/k/v and gate/up) and of the up projection's rows (the down projection's input) are multiplied by 50-100×
and the readers' columns divided by the same factor, so the full-precision model is unchanged while its
linears' inputs carry channels 50-100× their median: a controlled test of what a method does with outliers,
on a model too small or too well-behaved to have strong ones of its own (the demo).
"""

from __future__ import annotations

import copy

import torch

from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant.methods.base import STAGES

FACTORS = (50.0, 100.0)  # outlier channels are scaled by a factor drawn from this range


@torch.no_grad()
def plant_outliers(model: DiffusionLM, channels: int = 4, seed: int = 0, equivalent: bool = True) -> DiffusionLM:
    """A copy of `model` whose block linears see `channels` outlier channels per input; `equivalent` divides the
    readers' columns back, so it computes what `model` does, else the readers keep their weights."""
    planted = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    prefix = {id(m): n for n, m in planted.module.named_modules()}
    for block in planted.blocks():
        name = prefix[id(block)] + "."
        linears = {l.name[len(name):]: l for l in planted.linear_layers() if l.name.startswith(name)}
        for first_role, producer_name in planted.scale_producers.items():
            if first_role not in ("q", "gate", "down"):  # o's producer (v) would change attention's values only
                continue
            stage = next(roles for roles in STAGES if first_role in roles)
            producer = block.get_submodule(producer_name)
            width = producer.weight.shape[0]
            picked = torch.randperm(width, generator=g)[:channels]
            factor = FACTORS[0] + (FACTORS[1] - FACTORS[0]) * torch.rand(channels, generator=g)
            scale = torch.ones(width)
            scale[picked] = factor
            scale = scale.to(producer.weight.device)
            producer.weight.mul_(scale.view(-1, *([1] * (producer.weight.dim() - 1))).to(producer.weight.dtype))
            for local, layer in linears.items():
                if equivalent and layer.role in stage:
                    reader = block.get_submodule(local)
                    reader.weight.div_(scale.to(reader.weight.dtype))
    return planted
