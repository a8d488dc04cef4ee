"""Mixed precision to a memory budget: each linear gets the bits that cost the least error for the bytes allowed.

    plan = jobs.run(budget_plan(model, QuantRecipe(method="gptq", wbits=4, memory_budget=5 * 10**9)))
    print(plan.text())
    result = jobs.run(quantize(model, plan.apply(recipe)))

1. Sensitivity (`sensitivity`, a job; per block `block_sensitivity`): for every linear the recipe quantizes and
   every bit-width b the method produces up to `recipe.wbits`, a proxy of the output error b would cause,
       E(b) = sum_j E[x_j^2] * ||W[:, j] - RTN_b(W)[:, j]||^2,
   the expected squared output error under a diagonal approximation of the layer's Hessian (E[x_j^2] over the
   calibration tokens reaching it in the full-precision model; Quant-dLLM and HAWQ-style allocators weigh
   rounding error by input energy the same way). Round-to-nearest stands in for every method: GPTQ and AWQ
   lower each layer's error, but the question is only how it changes with b, layer against layer.
2. The plan (`plan_bits`): a multiple-choice knapsack, one bit-width per layer, minimising the summed proxy
   subject to the stored bytes fitting the budget: the whole model's weights as stored (every tensor not
   quantized at the model's dtype, plus the quantized linears' codes, scales and zero points), or
   `target_bpw` stored bits per quantized weight (scales and zero points included, as `summarize` counts).
3. The recipe records the plan (`QuantRecipe.layer_bits`), the pipeline rounds each layer at its bits, and the
   native checkpoint's `quantization_config.layer_bits` says which layers differ from `bits`.
Only the LM head, whose inputs lie outside the blocks, is not planned: quantized (not skipped) it takes `wbits`.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from dllm_studio.errors import QuantizationError
from dllm_studio.events import CancelToken, Event, SensitivityProgress
from dllm_studio.memory import human
from dllm_studio.models.base import DiffusionLM, LinearLayer
from dllm_studio.quant import capture
from dllm_studio.quant.calibration import calibration_batch
from dllm_studio.quant.capture import BATCH
from dllm_studio.quant.grid import Grid, dequantize, rtn
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe

BINS = 1 << 15  # the knapsack's byte axis: the room above the smallest plan, in at most this many steps


def candidate_bits(recipe: QuantRecipe) -> tuple[int, ...]:
    """The bit-widths a plan may give a layer: those the method produces, up to the recipe's `wbits`."""
    return tuple(sorted(b for b in recipe.spec.weight_bits if b <= recipe.wbits))


# ---- sensitivity ------------------------------------------------------------------------------------

def proxy_error(weight: torch.Tensor, moment: torch.Tensor, bits: int, recipe: QuantRecipe) -> float:
    """sum_j E[x_j^2] ||W[:, j] - RTN_bits(W)[:, j]||^2 on the recipe's groups and grid."""
    w = weight.detach().float()
    q, scales, zeros = rtn(w, Grid(bits, recipe.symmetric), recipe.group_size)
    residual = w - dequantize(q, scales, zeros, recipe.group_size)
    return float((residual.pow(2).sum(0) * moment.to(w.device)).sum())


def block_sensitivity(block: nn.Module, layers: dict[str, LinearLayer], states: list, masks: list,
                      recipe: QuantRecipe, cancel: CancelToken | None = None) -> dict[str, dict[int, float]]:
    """{layer name: {bits: proxy error}} for the linears `layers` (local name -> layer) of one full-precision
    block, from the calibration `states` entering it (as `capture.block_inputs` gives them) and their `masks`;
    `cancel` is checked through the calibration forwards and per layer."""
    taps = capture.collect(block, list(layers), states, masks, stats=True, cancel=cancel)
    table = {}
    for local, layer in layers.items():
        if cancel is not None:
            cancel.check()
        stats = taps[local].stats
        moment = (stats.sumsq / max(stats.tokens, 1)).float()
        weight = block.get_submodule(local).weight
        table[layer.name] = {bits: proxy_error(weight, moment, bits, recipe) for bits in candidate_bits(recipe)}
    return table


def sensitivity(model: DiffusionLM, recipe: QuantRecipe, cancel: CancelToken | None = None, store=None
                ) -> Generator[Event, None, dict[str, dict[int, float]]]:
    """The job measuring `block_sensitivity` block by block through the full-precision model (the calibration
    states of block i+1 are block i's outputs); yields SensitivityProgress per block, stops between blocks once
    `cancel` is set. Returns {layer name: {bits: proxy error}}. `store` (a `pipeline.BlockStore`) says where the
    blocks come from: the loaded model's own by default, or `streaming.FromShards` for a model on meta."""
    from dllm_studio.quant.pipeline import BlockStore, _prefix, check_supported  # the pipeline imports much the plan needs not

    store = store or BlockStore()

    recipe.check_mixed_bits()
    check_supported(model)
    cancel = cancel or CancelToken()
    blocks = model.blocks()
    planned = planned_layers(model, recipe)
    ids, masked = calibration_batch(model, recipe)
    started, table = time.perf_counter(), {}
    with torch.no_grad():
        with store.outside_blocks(model, "input"):
            states = capture.block_inputs(model.module, blocks[0], ids.to(model.device))
        masks = list(masked.to(model.device).split(BATCH))
        for index, block in enumerate(blocks):
            cancel.check()
            prefix = _prefix(model, block)
            layers = {l.name[len(prefix):]: l for l in planned if l.block == index}
            with store.reading(model, prefix, block):
                table.update(block_sensitivity(block, layers, states, masks, recipe, cancel))
                if index + 1 < len(blocks):
                    with capture.checking(block, cancel):
                        states = [((capture.run(block, args, kwargs), *args[1:]), kwargs) for args, kwargs in states]
            elapsed = time.perf_counter() - started
            yield SensitivityProgress(index + 1, len(blocks), round(elapsed, 2),
                                      round(elapsed / (index + 1) * (len(blocks) - index - 1), 1))
    return table


def planned_layers(model: DiffusionLM, recipe: QuantRecipe) -> list[LinearLayer]:
    """The linears a plan decides: every block linear the recipe quantizes."""
    return [l for l in model.linear_layers() if l.block is not None and not recipe.skips(l.name, l.role)]


# ---- sizes ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """What a plan's choices cost, in bytes as stored."""

    layers: dict[str, LinearLayer]  # the planned linears, by name
    bytes: dict[str, dict[int, int]]  # per planned linear, per bits: codes, scales, zero points (and g_idx)
    fixed: int  # every other tensor (at the dtype it is held in; a quantized head at `wbits`)


def stored_bytes(layer: LinearLayer, bits: int, recipe: QuantRecipe) -> int:
    """Bytes of one linear quantized at `bits`, as `QuantLinear` stores it: counted off an empty shell, so the
    last, shorter group's scale and the packing's padding are in (`theory_bits`, per weight, leaves them out,
    and a budget must hold for the bytes actually written). The bias stays as it was: `Sizes.fixed` counts it."""
    shell = QuantLinear(layer.in_features, layer.out_features, bits, recipe.group_size, act_order=recipe.act_order,
                        device="meta")
    return sum(t.numel() * t.element_size() for t in shell.buffers())


def stored_sizes(model: DiffusionLM, recipe: QuantRecipe) -> Sizes:
    """The planned linears' bytes at each candidate bit-width, and the bytes of the rest of the model."""
    from dllm_studio.quant.runtimes import held_bytes

    planned = planned_layers(model, recipe)
    heads = [l for l in model.linear_layers() if l.role == "head" and not recipe.skips(l.name, l.role)]
    replaced = [model.module.get_submodule(l.name).weight for l in (*planned, *heads)]
    # A weight that another module also holds (a head tied to the embedding) stays after its linear is quantized.
    holders = {}
    for _, p in model.module.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    gone = {id(w) for w in replaced if holders.get(id(w), 0) == 1}
    tensors = {id(t): t for t in (*model.module.parameters(), *model.module.buffers())}
    fixed = sum(held_bytes(t) for key, t in tensors.items() if key not in gone)
    fixed += sum(stored_bytes(l, recipe.wbits, recipe) for l in heads)
    return Sizes({l.name: l for l in planned},
                 {l.name: {b: stored_bytes(l, b, recipe) for b in candidate_bits(recipe)} for l in planned}, fixed)


# ---- the plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BitPlan:
    bits: dict[str, int]  # planned layer name -> bits
    layer_bytes: int  # the planned linears as stored
    fixed_bytes: int  # everything else (`Sizes.fixed`)
    weights: int  # weights of the planned linears
    error: float  # the summed proxy error of the choice
    layers: tuple[LinearLayer, ...]  # in model order, for the bit map
    memory_budget: int | None = None
    target_bpw: float | None = None

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes + self.fixed_bytes

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per planned weight, scales and zero points included (`summarize`'s bits_per_weight)."""
        return self.layer_bytes * 8 / max(self.weights, 1)

    def apply(self, recipe: QuantRecipe) -> QuantRecipe:
        """`recipe` with this plan (and the budget it was made for) recorded."""
        return replace(recipe, layer_bits=tuple(sorted(self.bits.items())), memory_budget=self.memory_budget,
                       target_bpw=self.target_bpw).validate()

    def text(self) -> str:
        """The bit map, one row per block with each role's bits, and the totals against the budget."""
        rows: dict[int, list[str]] = {}
        for layer in self.layers:
            rows.setdefault(layer.block, []).append(f"{layer.role} {self.bits[layer.name]}")
        width = len(str(max(rows, default=0)))
        lines = ["bit plan (bits per layer, by block):"]
        lines += [f"  block {block:>{width}}  " + "  ".join(cells) for block, cells in rows.items()]
        counts = {}
        for bits in self.bits.values():
            counts[bits] = counts.get(bits, 0) + 1
        lines.append("  " + ", ".join(f"{n} layers at {b} bits" for b, n in sorted(counts.items())))
        bpw = f"{self.bits_per_weight:.3f} bits per quantized weight"
        if self.target_bpw is not None:
            lines.append(f"  {bpw} (target {self.target_bpw:g}); weights {human(self.total_bytes)}")
        else:
            budget = f" of a {human(self.memory_budget)} budget" if self.memory_budget is not None else ""
            lines.append(f"  weights {human(self.total_bytes)} ({self.total_bytes:,} bytes){budget}; {bpw}")
        return "\n".join(lines)


def plan_bits(table: dict[str, dict[int, float]], sizes: Sizes, recipe: QuantRecipe, *,
              memory_budget: int | None = None, target_bpw: float | None = None) -> BitPlan:
    """The bits per layer minimising the summed proxy error (`table`) within `memory_budget` bytes of the whole
    model's weights as stored, or `target_bpw` stored bits per quantized weight (exactly one of them).

    A budget below every layer at its fewest bits is refused, naming the smallest size reachable; one above
    every layer at `recipe.wbits` gives every layer `wbits`."""
    if (memory_budget is None) == (target_bpw is None):
        raise QuantizationError("A bit plan needs a memory budget or a target bits per weight (one of them).")
    names = [n for n in sizes.layers if n in table]
    missing = sorted(set(sizes.layers) - set(table))
    if missing:
        raise QuantizationError(f"The sensitivity table has no row for {missing[0]}; measure it for this recipe.")
    weights = sum(sizes.layers[n].in_features * sizes.layers[n].out_features for n in names)
    options = [sorted(sizes.bytes[n]) for n in names]
    costs = [[sizes.bytes[n][b] for b in bits] for n, bits in zip(names, options)]
    errors = [[table[n][b] for b in bits] for n, bits in zip(names, options)]
    capacity = memory_budget - sizes.fixed if memory_budget is not None else int(target_bpw * weights / 8)
    least = sum(min(c) for c in costs)
    if least > capacity:
        if memory_budget is not None:
            raise QuantizationError(
                f"A memory budget of {human(memory_budget)} ({memory_budget:,} bytes) cannot hold the model: "
                f"with every quantized layer at {options[0][0] if options else recipe.wbits} bits its weights take "
                f"at least {human(least + sizes.fixed)} ({least + sizes.fixed:,} bytes), of which "
                f"{human(sizes.fixed)} are tensors left unquantized.")
        raise QuantizationError(f"A target of {target_bpw:g} bits per weight is below the least this recipe stores: "
                                f"{least * 8 / max(weights, 1):.3f} bits per weight (scales and zero points included).")
    picks = knapsack(errors, costs, capacity)
    layer_bits = {n: bits[k] for n, bits, k in zip(names, options, picks)}
    return BitPlan(layer_bits, sum(c[k] for c, k in zip(costs, picks)), sizes.fixed, weights,
                   sum(e[k] for e, k in zip(errors, picks)), tuple(sizes.layers[n] for n in names),
                   memory_budget, target_bpw)


def knapsack(errors: list[list[float]], costs: list[list[int]], capacity: int, bins: int = BINS) -> list[int]:
    """One choice per item (its index), minimising the summed error with the summed cost <= `capacity`
    (which the cheapest choices must fit).

    Dynamic programming over the byte axis, exact for whatever errors the layers have: a Lagrangian relaxation
    only reaches the plans on the convex hull of the error-bytes trade-off and leaves budgets between them
    partly unused, and a layer's error need not fall convexly with its bits. Above the cheapest plan the room is
    cut into at most `bins` steps, each choice's extra cost rounded up to whole steps, so a plan found always
    fits the true budget; it is the exact optimum whenever the room is at most `bins` bytes (steps of one
    byte), and otherwise loses at most one step per layer of room, which the final greedy fill spends on the
    upgrades that lower the error most.
    """
    base = [min(c) for c in costs]
    room = capacity - sum(base)
    step = max(1, -(-room // bins))
    top = room // step
    extra = [[-(-(c - b) // step) for c in row] for row, b in zip(costs, base)]
    best = np.zeros(top + 1)  # least error of the items so far with extra cost <= index (in steps)
    picks = []
    for errs, steps in zip(errors, extra):
        new, pick = np.full(top + 1, np.inf), np.zeros(top + 1, dtype=np.int16)
        for k, (e, w) in enumerate(zip(errs, steps)):
            if w > top:
                continue
            candidate = np.full(top + 1, np.inf)
            candidate[w:] = best[:top + 1 - w] + e
            better = candidate < new
            new[better], pick[better] = candidate[better], k
        best = new
        picks.append(pick)
    chosen, at = [], top
    for pick, steps in zip(reversed(picks), reversed(extra)):
        k = int(pick[at])
        chosen.append(k)
        at -= steps[k]
    chosen.reverse()
    # The greedy fill: the bytes the rounding up left, on the largest error drop that still fits, while one does.
    left = capacity - sum(c[k] for c, k in zip(costs, chosen))
    while True:
        gain, item, k = max(((errors[i][chosen[i]] - errors[i][j], i, j) for i in range(len(costs))
                             for j in range(len(costs[i])) if costs[i][j] - costs[i][chosen[i]] <= left),
                            default=(0.0, -1, -1))
        if gain <= 0:
            return chosen
        left -= costs[item][k] - costs[item][chosen[item]]
        chosen[item] = k


def reachable_sizes(model: DiffusionLM, recipe: QuantRecipe) -> Sizes:
    """`stored_sizes`, once `recipe`'s own budget is known to hold `model` at all (else the QuantizationError
    naming the least size reachable): a check costing no sensitivity pass, so a sweep can say it up front."""
    recipe.validate()
    if recipe.memory_budget is None and recipe.target_bpw is None:
        raise QuantizationError("The recipe sets no memory budget or target bits per weight to plan for.")
    sizes = stored_sizes(model, recipe)
    blank = {name: dict.fromkeys(costs, 0.0) for name, costs in sizes.bytes.items()}
    plan_bits(blank, sizes, recipe, memory_budget=recipe.memory_budget, target_bpw=recipe.target_bpw)
    return sizes


def budget_plan(model: DiffusionLM, recipe: QuantRecipe, cancel: CancelToken | None = None, store=None
                ) -> Generator[Event, None, BitPlan]:
    """The job planning `recipe` to its own `memory_budget` or `target_bpw`: the sensitivity (SensitivityProgress
    per block; its blocks from `store`, see `sensitivity`), then the knapsack. `plan.apply(recipe)` is the recipe
    to quantize with."""
    sizes = reachable_sizes(model, recipe)
    table = yield from sensitivity(model, recipe, cancel, store)
    return plan_bits(table, sizes, recipe, memory_budget=recipe.memory_budget, target_bpw=recipe.target_bpw)
