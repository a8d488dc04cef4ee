"""Quantize a model block by block, as a job that yields live events and can be cancelled within a second of work.

    result = jobs.run(quantize(model, QuantRecipe(method="gptq", wbits=4)), on_event=print)

The loop knows no method by name: the recipe's method (`quant.methods`) decides what calibration gathers,
how a block is changed before rounding and how each linear is rounded. For each transformer block, in order:
1. take the block from the store (`BlockStore`): by default a copy (the only full-precision copy ever made: one
   block, never the model); streaming (`quant.streaming`), the block itself, read from the shards;
2. feed it the calibration hidden states that the already-quantized blocks before it produced;
3. if the method prepares blocks (AWQ/SmoothQuant scales, QuaRot/DuQuant rotations): record the untouched
   block's linear inputs (a `LayerStats` event each) and let it change the copy;
4. round the linears: all at once, or in the method's stages (GPTQ: q/k/v, then o, then gate/up, then down,
   each stage seeing the inputs the quantized stages before it produce), each from what its hooks gathered
   (statistics, Hessians, a sample of inputs), replacing it by a `QuantLinear` (a `LayerQuantized` event;
   `LayerTransformed` first where the method changed its inputs, statistics before and after);
5. run the quantized block to produce the next block's inputs, and hand it to the store (kept in memory, or
   written to disk and released) (a `BlockQuantized` event).
In memory, the original model is only read: the result shares its untouched tensors (embeddings, norms outside the
blocks, unless the method replaces them: QuaRot rotates the embedding and the head) and owns the quantized
blocks. Cancelling discards the copies and leaves it as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from torch import nn

from dllm_studio.checkpoint import nonfinite_tensors
from dllm_studio.errors import QuantizationError
from dllm_studio.events import (BlockQuantized, CancelToken, Event, LayerQuantized, LayerStats, LayerTransformed,
                                Progress)
from dllm_studio.memory import MemorySampler
from dllm_studio.models.base import DiffusionLM, LinearLayer
from dllm_studio.profile import InputStats, outlier_ratio
from dllm_studio.quant import capture, kernels, runtimes
from dllm_studio.quant.calibration import calibration_batch
from dllm_studio.quant.capture import BATCH, SAMPLE_TOKENS
from dllm_studio.quant.kernels.base import fake_quantize_activations
from dllm_studio.quant.methods.base import Block, Method
from dllm_studio.quant.progress import Unit, WorkMeter, error_report_cost, forward_cost
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe


@dataclass
class QuantizationResult:
    model: DiffusionLM  # the quantized model, ready to run
    recipe: QuantRecipe
    summary: dict
    layers: list[dict] = field(default_factory=list)  # LayerStats and LayerQuantized, as dicts, per layer


def quantize(model: DiffusionLM, recipe: QuantRecipe, cancel: CancelToken | None = None, *,
             store: BlockStore | None = None) -> Generator[Event, None, QuantizationResult]:
    """The quantization job. Yields LayerStats, LayerTransformed (methods that change the linears' inputs),
    LayerQuantized, BlockQuantized and MemorySample events, and a Progress event as each unit of work (a
    calibration pass, the method's search, a linear's rounding) starts and ends.

    `store` says where each full-precision block comes from and where its quantized form goes: by default
    (`InMemory`) a copy of the loaded model's block, kept for the quantized model; `quant.streaming` reads each
    block from the checkpoint's shards and writes it to the output folder instead, so neither model is ever
    resident whole."""
    recipe.validate()
    check_supported(model)
    cancel = cancel or CancelToken()
    store = store or InMemory()
    blocks = model.blocks()
    by_block: dict[int, list[LinearLayer]] = {}
    for layer in model.linear_layers():
        if layer.block is not None:
            by_block.setdefault(layer.block, []).append(layer)
    targets = [l for layers in by_block.values() for l in layers if not recipe.skips(l.name, l.role)]
    if not targets:
        raise QuantizationError(f"The recipe skips every linear layer of {model.source} (skip: {', '.join(recipe.skip)}).")
    _check_shapes(targets)

    ids, masked = calibration_batch(model, recipe)
    ids, masked = ids.to(model.device), masked.to(model.device)
    before = (model.weight_bytes(), model.num_parameters())  # a streamed model's blocks change in place
    started = time.perf_counter()
    with MemorySampler() as memory, torch.no_grad():
        method = recipe.spec.implementation()(model, recipe, cancel)  # its searches check the token too
        with store.outside_blocks(model, "input"):  # what runs before the first block (the embedding), only then
            states = [((method.hidden_states(args[0]), *args[1:]), kwargs)
                      for args, kwargs in capture.block_inputs(model.module, blocks[0], ids)]
        first, resumed, records = store.resume(model, recipe, len(blocks))
        if resumed is not None:  # the calibration stream as the finished blocks left it
            states = [((hidden, *args[1:]), kwargs) for hidden, (args, kwargs) in zip(resumed, states)]
        plan = [_block_units(method, index, by_block.get(index, []), ids.shape, model.hidden_size)
                for index in range(len(blocks))]
        meter = WorkMeter([u for units in plan for u in units], skipped=sum(len(units) for units in plan[:first]),
                          started=started)
        masks = list(masked.split(BATCH))
        for index in range(first, len(blocks)):
            cancel.check()
            block = blocks[index]
            prefix = _prefix(model, block)
            work = store.open(model, prefix, block)
            in_block = {l.name[len(prefix):]: l for l in by_block.get(index, [])}  # local name -> layer
            layers = {n: l for n, l in in_block.items() if not recipe.skips(l.name, l.role)}
            collect = functools.partial(capture.collect, work, states=states, masks=masks, cancel=cancel)
            # What the untouched block reads: the stream in the original model's basis (QuaRot's is rotated).
            plain = [((method.plain_states(args[0]), *args[1:]), kwargs) for args, kwargs in states]
            untouched = functools.partial(capture.collect, work, states=plain, masks=masks, cancel=cancel)
            for event in _quantize_block(method, Block(index, work, layers, in_block, collect), untouched, cancel,
                                         meter):
                if not isinstance(event, Progress):
                    records.setdefault(event.name, {}).update(_record(event))
                yield event
            yield meter.start((index, "output"))
            with capture.checking(work, cancel):  # the next block's inputs
                states = [((capture.run(work, args, kwargs), *args[1:]), kwargs) for args, kwargs in states]
            cancel.check()  # a cancel during the last layer leaves nothing of this block behind
            store.keep(index, prefix, work, [args[0] for args, _ in states],
                       {l.name: records[l.name] for l in in_block.values() if l.name in records})
            yield from memory.drain()
            progress = meter.finish((index, "output"))
            yield progress
            block_records = [records[l.name] for l in layers.values()]
            yield BlockQuantized(
                block=index + 1, blocks=len(blocks), elapsed_s=progress.elapsed_s, eta_s=progress.eta_s,
                max_outlier_ratio=max((r.get("outlier_ratio", 0.0) for r in block_records), default=0.0),
                mean_relative_error=sum(r["relative_error"] for r in block_records) / max(len(block_records), 1),
                rss_bytes=memory.latest.rss_bytes, peak_rss_bytes=memory.peak)
        with store.outside_blocks(model, "all" if _changes_outside(model, recipe) else "none"):
            outside = method.outside()
            head = _quantize_head(model, method, outside)
            quantized = _assemble(model, blocks, store.quantized_blocks(blocks), {**outside, **head}, recipe)
            result = QuantizationResult(quantized, recipe, {}, list(records.values()))
            result.summary = summarize(model, quantized, recipe, seconds=time.perf_counter() - started,
                                       peak_rss=memory.peak, before=before)
            yield from store.finish(model, result, cancel)
        yield from memory.drain()
    result.summary.update(seconds=round(time.perf_counter() - started, 2), peak_rss_bytes=memory.peak)
    return result


class BlockStore:
    """Where the block loop gets each full-precision block, and where each quantized one goes."""

    @contextlib.contextmanager
    def outside_blocks(self, model: DiffusionLM, part: str = "all"):
        """The tensors outside the blocks are in memory inside this context: "input", those the module holds
        before its first block (the embedding, enough to compute the first block's inputs); "all", the final norm
        and head too; "none", none."""
        yield

    def resume(self, model: DiffusionLM, recipe: QuantRecipe, blocks: int
               ) -> tuple[int, list[torch.Tensor] | None, dict[str, dict]]:
        """(the first block still to quantize, the calibration hidden states entering it, the finished blocks'
        records); (0, None, {}) for a fresh run."""
        return 0, None, {}

    def open(self, model: DiffusionLM, prefix: str, block: nn.Module) -> nn.Module:
        """A full-precision block the method may change in place."""
        raise NotImplementedError

    @contextlib.contextmanager
    def reading(self, model: DiffusionLM, prefix: str, block: nn.Module):
        """The full-precision block, to read (not change) inside this context: a pass that only measures."""
        yield block

    def keep(self, index: int, prefix: str, work: nn.Module, states: list[torch.Tensor], records: dict) -> None:
        """Take block `index` once quantized (with the calibration states it produced, and its layers' records)."""
        raise NotImplementedError

    def quantized_blocks(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """The quantized blocks, in order, for the quantized model (held in memory, or described on meta)."""
        return list(blocks)

    def finish(self, original: DiffusionLM, result: QuantizationResult, cancel: CancelToken
               ) -> Generator[Event, None, None]:
        """Called once every block is kept, with the assembled model and its summary; may yield events."""
        yield from ()


class InMemory(BlockStore):
    """Quantize a loaded model: each block is a copy (the original is only read), kept in memory."""

    def __init__(self) -> None:
        self.blocks: list[nn.Module] = []

    def open(self, model, prefix, block):
        return copy.deepcopy(block)  # the only full-precision copy ever made: one block, never the model

    def keep(self, index, prefix, work, states, records):
        self.blocks.append(work)

    def quantized_blocks(self, blocks):
        return self.blocks

    def finish(self, original, result, cancel):
        kernels.prepare(result.model.module, original.dtype)  # as a loaded folder does: Chat's first step is not slower
        yield from ()


def _changes_outside(model: DiffusionLM, recipe: QuantRecipe) -> bool:
    """Whether the quantized model needs the tensors outside the blocks: a method replacing them (QuaRot
    rotates the embedding and the head) or an LM head the recipe quantizes."""
    return (recipe.spec.implementation().outside is not Method.outside
            or any(l.role == "head" and not recipe.skips(l.name, l.role) for l in model.linear_layers()))


def check_supported(model: DiffusionLM, *, weights: bool = True) -> None:
    """Refuse, before any work, a family the block-by-block quantizer cannot take, or weights it cannot.

    `weights=False` checks the family only, at once: the weight check reads every weight (seconds for an 8B),
    so a preflight redone as the user edits the recipe leaves it to the run, which does it on its own thread."""
    if model.not_quantizable:
        raise QuantizationError(f"{model.source} ({model.family}) cannot be quantized: {model.not_quantizable}.")
    if not weights:
        return
    bad = nonfinite_tensors(model.module.named_parameters())
    if bad:  # they would poison the calibration activations and GPTQ's Hessians
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise QuantizationError(f"{model.source} cannot be quantized: tensor {bad[0]}{more} holds NaN or infinite "
                                "values. Repair or replace the checkpoint first.")


def _prepares(method: Method) -> bool:
    return type(method).prepare_block is not Method.prepare_block


def _stages(method: Method, layers: dict[str, LinearLayer]) -> list[list[str]]:
    """The local names of the linears captured and rounded together, in order (GPTQ: q/k/v, o, gate/up, down)."""
    stages = [[n for n, l in layers.items() if l.role in roles] for roles in method.stages or ()] or [list(layers)]
    stages.append([n for n in layers if not any(n in s for s in stages)])  # roles outside the known stages
    return list(filter(None, stages))


def _block_units(method: Method, index: int, linears: list[LinearLayer], batch: tuple[int, int], hidden: int
                 ) -> list[Unit]:
    """Block `index`'s work, in the order `_quantize_block` and the block loop do it, with each unit's cost
    (`quant.progress`); `linears` all of the block's, `batch` the calibration ids' (sequences, length)."""
    tokens, seq_len = batch[0] * batch[1], batch[1]
    rows = min(tokens, SAMPLE_TOKENS)
    # A pass's weights, from the shapes listed before any block was touched (a resumed run's are packed by now).
    params = sum(l.in_features * l.out_features for l in linears)
    layers = {l.name: l for l in linears if not method.recipe.skips(l.name, l.role)}
    here = f"block {index + 1}"
    def forward(step: str, doing: str, hessians=()) -> Unit:
        return Unit((index, step), "forward", step, forward_cost(tokens, params, seq_len, hidden, hessians),
                    f"{here}: {doing}")

    def rounding(layer: LinearLayer) -> Unit:  # the method's own work, then the error report on the sampled rows
        cost = method.round_cost(layer, rows) + error_report_cost(layer.in_features, layer.out_features, rows)
        return Unit((index, "round", layer.name), "round", layer.role, cost,
                    f"{here}: rounding {layer.name.rsplit('.', 1)[-1]}")

    output = forward("output", "computing the next block's inputs")
    if not layers:
        return [output]
    units = []
    if _prepares(method):
        units += [forward("untouched", "reading the untouched block"),
                  Unit((index, "prepare"), "prepare", "", method.search_cost(list(layers.values()), rows),
                       f"{here}: {method.recipe.method} search")]
        if method.transforms:
            units.append(forward("transformed", "reading the transformed block"))
    for stage in _stages(method, layers):
        roles = "/".join(dict.fromkeys(layers[n].role for n in stage))
        hessians = [layers[n].in_features for n in stage] if method.hessian else ()
        units.append(forward(f"calibrate {roles}", f"calibrating {roles}", hessians))
        units += [rounding(layers[n]) for n in stage]
    return units + [output]


def _quantize_block(method: Method, block: Block, untouched, cancel: CancelToken, meter: WorkMeter
                    ) -> Generator[Event, None, None]:
    """Let the method prepare one block copy, then round its linears stage by stage, in place. `untouched`
    collects what the block sees before the method changes it; `meter` hears as each unit starts and ends."""
    layers, i = block.layers, block.index
    if not layers:
        return
    before: dict[str, InputStats] = {}
    if _prepares(method):
        # The untouched block's inputs: the live profile shows them, and the method's searches read them.
        yield meter.start((i, "untouched"))
        taps = untouched(list(layers), stats=True)
        for name, tap in taps.items():
            yield tap.stats.event(layers[name].name, layers[name].role, layers[name].block)
        before = {name: tap.stats for name, tap in taps.items()}
        yield meter.finish((i, "untouched"))
        yield meter.start((i, "prepare"))
        yield from method.prepare_block(block, taps) or ()
        yield meter.finish((i, "prepare"))
        del taps  # their samples: the stages below sample again, one stage at a time
        if method.transforms:  # the same inputs after the change, still in full precision: what it did alone
            yield meter.start((i, "transformed"))
            after = block.collect(list(layers), stats=True)
            for name, layer in layers.items():
                yield _transformed(layer, before[name], after[name].stats, *method.transform_label(name))
            del after
            yield meter.finish((i, "transformed"))
    for stage in _stages(method, layers):
        cancel.check()
        step = f"calibrate {'/'.join(dict.fromkeys(layers[n].role for n in stage))}"
        yield meter.start((i, step))
        taps = block.collect(stage, stats=not before, hessian=method.hessian)
        yield meter.finish((i, step))
        for name in stage:
            cancel.check()
            tap, layer = taps[name], layers[name]
            yield meter.start((i, "round", layer.name))
            if name not in before:
                yield tap.stats.event(layer.name, layer.role, layer.block)
            t0 = time.perf_counter()
            linear, transform = capture.unwrap(block.module.get_submodule(name))
            rounder = method.at_bits(method.recipe.bits_of(layer.name))  # the recipe's bits, or its plan's
            qlinear = rounder.round(linear, layer, tap)
            if transform is not None:
                qlinear.transform = transform  # the layer applies it online, before rounding its inputs
            error = _relative_error(linear, qlinear, tap.inputs(None), cancel=cancel)
            capture.set_submodule(block.module, name, qlinear)
            progress = meter.finish((i, "round", layer.name))
            yield progress
            done, total = meter.count("round")
            yield LayerQuantized(layer.name, layer.role, layer.block, rounder.recipe.wbits, round(error, 6),
                                 round(time.perf_counter() - t0, 3), done, total, progress.elapsed_s,
                                 progress.eta_s, progress.fraction)


def _transformed(layer: LinearLayer, before: InputStats, after: InputStats, transform: str, detail: str
                 ) -> LayerTransformed:
    return LayerTransformed(layer.name, layer.role, layer.block, transform, round(before.kurtosis(), 4),
                            round(after.kurtosis(), 4), round(outlier_ratio(before.absmax), 4),
                            round(outlier_ratio(after.absmax), 4), round(float(before.absmax.max()), 5),
                            round(float(after.absmax.max()), 5), detail)


ERROR_ROWS = 1024  # tokens per chunk of the error report at most: no output product of the whole sample is held
# and fewer where a layer is wide, so a chunk's two products stay about half a second of one CPU thread between
# cancel checks (1024 rows of an 8B's MLP projection took 3.3 s: Cancel waited up to 2.9 s).
ERROR_MADDS = 1 << 33


def error_rows(linear: nn.Linear) -> int:
    """Tokens per chunk of `linear`'s error report."""
    return max(1, min(ERROR_ROWS, ERROR_MADDS // (2 * linear.in_features * linear.out_features)))


def _relative_error(linear: nn.Linear, qlinear: nn.Module, x: torch.Tensor, rows: int | None = None, *,
                    cancel: CancelToken | None = None) -> float:
    """||approx - reference|| / ||reference|| of the layer's outputs on `x` (tokens, in; at 16 bits or float32),
    `rows` tokens at a time (default `error_rows`), checking `cancel` before each."""
    rows = rows or error_rows(linear)
    weight = linear.weight.detach().float()
    dequantized = qlinear.dequantize(torch.float32) if isinstance(qlinear, QuantLinear) else None
    bias = linear.bias.detach().float() if linear.bias is not None else None
    error = norm = 0.0
    for chunk in x.split(rows):
        if cancel is not None:
            cancel.check()
        chunk = chunk.float()
        reference = chunk @ weight.T  # `x` as the layer sees it (after its transform, if any)
        if dequantized is not None:  # with the activations rounded as the layer rounds them
            approx = _rounded_inputs(qlinear, chunk) @ dequantized.T
        else:  # a library's module: its own forward (its kernels, its activation quantizers), less the bias
            approx = qlinear(chunk.to(linear.weight.dtype)).float()
            if bias is not None:
                approx = approx - bias  # out of place: a library's output may be its own tensor subclass
        error += float((approx - reference).pow(2).sum())
        norm += float(reference.pow(2).sum())
    return (error / max(norm, 1e-24)) ** 0.5


def _rounded_inputs(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return x if layer.act_bits == 16 else fake_quantize_activations(x, layer.act_bits, layer.act_clip)


def _quantize_head(model: DiffusionLM, method: Method, outside: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """LM-head linears the recipe does not skip, rounded without calibration inputs (theirs lie outside the
    blocks), as the method left them (QuaRot rotates the head first)."""
    return {layer.name: method.round(outside.get(layer.name) or model.module.get_submodule(layer.name), layer, None)
            for layer in model.linear_layers()
            if layer.role == "head" and not method.recipe.skips(layer.name, layer.role)}


def _assemble(model: DiffusionLM, blocks: nn.ModuleList, qblocks: list[nn.Module],
              heads: dict[str, nn.Module], recipe: QuantRecipe) -> DiffusionLM:
    """A new DiffusionLM whose module shares the original's other tensors and holds the quantized blocks."""
    memo = {id(t): t for t in (*model.module.parameters(), *model.module.buffers())}
    memo[id(blocks)] = nn.ModuleList(qblocks)
    for name, head in heads.items():
        memo[id(model.module.get_submodule(name))] = head
    module = copy.deepcopy(model.module, memo)
    quantized = copy.copy(model)
    quantized.module = module.eval()
    quantized.config = {**model.config, "quantization_config": quantization_config(recipe, module)}
    quantized.quantization = recipe
    return quantized


def quantization_config(recipe: QuantRecipe, module: nn.Module | None = None) -> dict:
    """The `quantization_config` block of a quantized model's config.json (native format; a library method's
    own, which may describe the quantized `module` layer by layer)."""
    if recipe.method in runtimes.METHODS:
        return runtimes.quantization_config(recipe, module)
    per_row = recipe.per_channel or recipe.spec.layout == "codebook"  # the recipe's group size does not apply
    config = {"quant_method": "dllm_studio", "method": recipe.method, "bits": recipe.wbits,
              "group_size": -1 if per_row else recipe.group_size or -1, "sym": recipe.symmetric or recipe.per_channel,
              "desc_act": recipe.act_order,
              "skip": list(recipe.skip), "format": "packed-uint8"}
    if recipe.mixed:  # a budget plan (`quant.budget`): the layers whose bits differ from `bits`
        config["layer_bits"] = {name: bits for name, bits in recipe.layer_bits if bits != recipe.wbits}
    # The activation grid is the layers' own (every layer shares it); a weight-only model's config is unchanged.
    layer = next((m for m in module.modules() if isinstance(m, QuantLinear)), None) if module is not None else None
    if layer is not None and layer.act_bits != 16:
        config.update(act_bits=layer.act_bits, act_clip=layer.act_clip)
    # Linears reading one input share one transform, stored once under the first one's name.
    owners, shared = {}, {}
    for name, m in (module.named_modules() if module is not None else ()):
        if isinstance(m, QuantLinear) and m.transform is not None:
            owner = owners.setdefault(id(m.transform), name)
            if owner != name:
                shared[name] = owner
    if shared:
        config["shared_transforms"] = shared
    return config


def summarize(original: DiffusionLM, quantized: DiffusionLM, recipe: QuantRecipe, *, seconds: float,
              peak_rss: int, before: tuple[int, int] | None = None) -> dict:
    """The quantization's numbers; `before` is the original's (weight bytes, parameters), taken before a streaming
    run quantized its blocks in place (by default read off `original`)."""
    before = before or (original.weight_bytes(), original.num_parameters())
    qlayers = [m for m in quantized.module.modules() if isinstance(m, QuantLinear) or runtimes.method_of(m)]
    weights = sum(m.in_features * m.out_features for m in qlayers)
    held = {id(t): t for m in qlayers if isinstance(m, QuantLinear)  # a shared transform counts once
            for name, t in m.stored_tensors().items() if name != "bias"}
    packed = (sum(t.numel() * t.element_size() for t in held.values())
              + sum(runtimes.stored_bytes(m) for m in qlayers if not isinstance(m, QuantLinear)))
    source_bytes = weights * original.dtype.itemsize
    widest = max((m.in_features for m in qlayers), default=None)
    per_row = recipe.method in runtimes.METHODS or recipe.per_channel or recipe.spec.layout == "codebook"
    return {
        "recipe": recipe.label, "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss,
        "quantized_layers": len(qlayers), "quantized_weights": weights,
        "bits_per_weight": round(packed * 8 / max(weights, 1), 4),
        "theory_bits_per_weight": round(_theory_bits(qlayers, recipe, widest if per_row else None,
                                                     original.dtype.itemsize * 8), 4),
        "linear_bytes_before": source_bytes, "linear_bytes_after": packed, "linear_bytes_bf16": weights * 2,
        "model_bytes_before": before[0], "model_bytes_after": quantized.weight_bytes(),
        "model_bytes_before_bf16": before[1] * 2,
    }


def _theory_bits(qlayers: list[nn.Module], recipe: QuantRecipe, in_features: int | None, dtype_bits: int) -> float:
    """`theory_bits` over the quantized layers, weighted by their weights: each QuantLinear at its own bits (a
    mixed-precision plan's differ), a library's layer at the recipe's."""
    weights = sum(m.in_features * m.out_features for m in qlayers)
    if not recipe.mixed or not weights:
        return theory_bits(recipe, in_features, dtype_bits)
    def bits(m: nn.Module) -> float:
        return theory_bits(dataclasses.replace(recipe, wbits=getattr(m, "bits", recipe.wbits)), in_features, dtype_bits)

    return sum(m.in_features * m.out_features * bits(m) for m in qlayers) / weights


# What a run holds beyond its tensors: torch's kernels and thread pools warming up on the first block, the
# allocator's slack, the events and the profile. Measured as the peak less every counted part: 0.10-0.14 GB for
# each method on a tiny LLaDA and on the 8B-shaped one (benchmarks/bench_preflight.py).
RUNTIME_BYTES = 150_000_000


def working_set(model: DiffusionLM, recipe: QuantRecipe, *, streaming: bool = False) -> dict[str, int]:
    """Bytes a quantization run needs at its peak, by part (for the memory preflight); `model` may live on meta.

    In memory: the loaded model, the quantized copy growing beside it, a copy of one block and that block's working
    set. Streaming (`quant.streaming`): whichever phase holds more, the tensors outside the blocks while the
    calibration batch is embedded, or one block read from the shards with its working set (the quantized blocks
    are on disk). A block's working set is the calibration stream, the sampled inputs (16-bit; linears reading one
    input share a sample), and for Hessian methods one stage's Hessians with the solver's working copies."""
    linears = [l for l in model.linear_layers() if l.block is not None]
    per_block = max(sum(l.in_features * l.out_features for l in linears if l.block == b)
                    for b in {l.block for l in linears}) if linears else 0
    d = model.hidden_size
    widest = max((l.in_features for l in linears), default=d)
    largest = max((l.in_features * l.out_features for l in linears), default=0)
    quantized = sum(l.in_features * l.out_features for l in linears if not recipe.skips(l.name, l.role))
    tokens = recipe.calib_samples * recipe.seq_len
    rows = min(tokens, SAMPLE_TOKENS)
    method = recipe.spec.implementation()
    staged = method.stages is not None and method.prepare_block is Method.prepare_block
    itemsize = model.dtype.itemsize
    work = {
        # the stream entering the block and the one it produces, and one batch's activations inside it
        "calibration activations": tokens * d * max(itemsize, 4) * 3,
        # q/k/v, o, gate/up and down each read one input (a staged method samples one stage at a time)
        "sampled inputs": 2 * rows * (widest if staged else 3 * d + widest) + 4 * rows * widest,
        # Then each layer's rounding: for Hessian methods one stage's Hessians, factored in place beside a packed
        # half copy, and the solver's fp32 weights and codes for the widest layer; after that (never both at once)
        # the error report: the layer's fp32 weight and dequantized copy and its chunk of tokens (the inputs at fp32
        # and rounded, with their activation quantizer's temporaries, the reference and approximate outputs and
        # their difference squared).
        ("Hessians and solver" if method.hessian else "error report"): max(
            4 * max(3 * d * d, widest * widest) + 2 * widest * widest + 9 * largest if method.hessian else 0,
            8 * largest + ERROR_ROWS * 4 * max((2 * l.in_features + 4 * l.out_features
                                                + (3 * l.in_features if recipe.abits < 16 else 0) for l in linears),
                                               default=0)),
        **method.working_bytes(model, [l for l in linears if not recipe.skips(l.name, l.role)]),
    }
    if not streaming:
        return {"model": model.num_parameters() * itemsize,
                "quantized copy": int(quantized * theory_bits(recipe, widest, itemsize * 8) / 8),
                "one block copy": per_block * itemsize, **work, "runtime": RUNTIME_BYTES}
    # Outside the blocks: while the calibration batch is embedded, the tensors before the first block (each read
    # at up to 2 bytes a weight, then converted); at the end, all of them, where the method replaces them.
    in_blocks = {id(t) for t in model.blocks().state_dict(keep_vars=True).values()}
    order = list({id(t): t for t in model.module.state_dict(keep_vars=True).values()}.values())
    first = next((i for i, t in enumerate(order) if id(t) in in_blocks), len(order))
    before = sum(t.numel() for t in order[:first])
    after = sum(t.numel() for t in order if id(t) not in in_blocks) if _changes_outside(model, recipe) else 0
    phases = [
        {"one block, read from the shards": per_block * itemsize, **work},
        {"the embedding (read while the calibration batch is embedded)": before * (itemsize + 2),
         "calibration activations": tokens * d * max(itemsize, 4) * 2},
        {"the tensors outside the blocks (the method replaces them)": after * (itemsize + 4)},
    ]
    return {**max(phases, key=lambda phase: sum(phase.values())), "runtime": RUNTIME_BYTES}


def theory_bits(recipe: QuantRecipe, in_features: int | None = None, dtype_bits: int = 16) -> float:
    """Bits per weight of the storage: the codes, plus a 16-bit scale and a `wbits` zero per group (a library
    method: its own layout, whose scales may be held at the model's `dtype_bits`)."""
    if recipe.method in runtimes.METHODS:
        return runtimes.theory_bits(recipe, in_features, dtype_bits)
    if recipe.spec.layout == "codebook":  # a 16-bit level per code, per row
        return recipe.wbits + (16 * 2 ** recipe.wbits / in_features if in_features else 0.0)
    group = None if recipe.per_channel else recipe.group_size
    group = group or in_features
    return recipe.wbits + ((16 + recipe.wbits) / group if group else 0.0)


def _check_shapes(targets: list[LinearLayer]) -> None:
    for layer in targets:
        if layer.in_features % 8:
            raise QuantizationError(f"{layer.name} has {layer.in_features} input features; packed storage needs a "
                                    "multiple of 8.")


def _prefix(model: DiffusionLM, block: nn.Module) -> str:
    for name, module in model.module.named_modules():
        if module is block:
            return name + "."
    raise QuantizationError("a block of the model could not be located by name")


def _record(event) -> dict:
    if isinstance(event, LayerStats):
        return {"name": event.name, "role": event.role, "block": event.block, "outlier_ratio": event.outlier_ratio,
                "kurtosis": event.kurtosis, "massive": event.massive, "top_channels": event.top_channels,
                "masked_outlier_ratio": event.masked_outlier_ratio,
                "unmasked_outlier_ratio": event.unmasked_outlier_ratio}
    if isinstance(event, LayerTransformed):
        return {"transform": event.transform, "transform_detail": event.detail,
                "kurtosis_after": event.kurtosis_after, "outlier_ratio_after": event.outlier_ratio_after}
    return {"relative_error": event.relative_error, "seconds": event.seconds}
