"""Quantize a model block by block, as a job that yields live events and can be cancelled between layers.

    result = jobs.run(quantize(model, QuantRecipe(method="gptq", wbits=4)), on_event=print)

For each transformer block, in order:
1. copy the block (the only full-precision copy ever made: one block, never the model);
2. feed it the calibration hidden states that the already-quantized blocks before it produced;
3. record its linears' inputs: activation statistics (a `LayerStats` event each), GPTQ's Hessians,
   and a sample of inputs for AWQ's searches and the error report;
4. quantize the linears: all at once (RTN, AWQ after folding its channel scales into the producers)
   or stage by stage (GPTQ: q/k/v, then o, then gate/up, then down, each stage seeing the inputs the
   quantized stages before it produce), replacing each by a `QuantLinear` (a `LayerQuantized` event);
5. run the quantized block to produce the next block's inputs (a `BlockQuantized` event).
The original model is only read: the result shares its untouched tensors (embeddings, norms outside
the blocks) and owns the quantized blocks. Cancelling discards the copies and leaves it as it was.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from torch import nn

from dllm_studio.checkpoint import nonfinite_tensors
from dllm_studio.errors import QuantizationError
from dllm_studio.events import BlockQuantized, CancelToken, Event, LayerQuantized, LayerStats
from dllm_studio.memory import MemorySampler
from dllm_studio.models.base import DiffusionLM, LinearLayer
from dllm_studio.profile import InputStats
from dllm_studio.quant import awq, kernels, runtimes
from dllm_studio.quant.calibration import calibration_batch
from dllm_studio.quant.gptq import Hessian, gptq
from dllm_studio.quant.grid import Grid, rtn
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe

# GPTQ's sequential stages inside a block: each reads what the stages before it produce.
STAGES = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))
SAMPLE_TOKENS = 4096  # input rows kept per linear for AWQ's searches and the error report
BATCH = 8  # calibration sequences per forward pass


@dataclass
class QuantizationResult:
    model: DiffusionLM  # the quantized model, ready to run
    recipe: QuantRecipe
    summary: dict
    layers: list[dict] = field(default_factory=list)  # LayerStats and LayerQuantized, as dicts, per layer


@dataclass
class _Tap:
    """What the hooks gather about one linear's input while calibration batches flow through a block."""

    stats: InputStats | None = None
    hessian: Hessian | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0

    def add(self, x: torch.Tensor, masked: torch.Tensor | None) -> None:
        if self.stats is not None:
            self.stats.add(x, masked)
        if self.hessian is not None:
            self.hessian.add(x)
        if self.sampled < SAMPLE_TOKENS:
            rows = x.detach().reshape(-1, x.shape[-1])[: SAMPLE_TOKENS - self.sampled]
            self.sample.append(rows.float())
            self.sampled += rows.shape[0]

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample)


class _Captured(Exception):
    pass


def quantize(model: DiffusionLM, recipe: QuantRecipe, cancel: CancelToken | None = None
             ) -> Generator[Event, None, QuantizationResult]:
    """The quantization job. Yields LayerStats, LayerQuantized, BlockQuantized and MemorySample events."""
    recipe.validate()
    check_supported(model)
    cancel = cancel or CancelToken()
    grid = Grid(recipe.wbits, recipe.symmetric)
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
    started = time.perf_counter()
    progress = _Progress(started, len(targets))
    qblocks: list[nn.Module] = []
    records: dict[str, dict] = {}
    with MemorySampler() as memory, torch.no_grad():
        states = _block_inputs(model, blocks, ids)
        masks = list(masked.split(BATCH))
        for index, block in enumerate(blocks):
            cancel.check()
            prefix = _prefix(model, block)
            work = copy.deepcopy(block)
            in_block = {l.name[len(prefix):]: l for l in by_block.get(index, [])}  # local name -> layer
            layers = {n: l for n, l in in_block.items() if not recipe.skips(l.name, l.role)}
            steps = [_quantize_block(work, layers, states, masks, grid, recipe, cancel, progress)]
            if recipe.method == "awq" and layers:  # scales first: they change what the rounding sees
                steps.insert(0, _apply_awq_scales(model, work, in_block, layers, states, masks, grid, recipe))
            for event in itertools.chain(*steps):
                records.setdefault(event.name, {}).update(_record(event))
                yield event
            states = [((_run(work, args, kwargs), *args[1:]), kwargs) for args, kwargs in states]  # next block's inputs
            qblocks.append(work)
            yield from memory.drain()
            done = index + 1
            elapsed = time.perf_counter() - started
            block_records = [records[l.name] for l in layers.values()]
            yield BlockQuantized(
                block=done, blocks=len(blocks), elapsed_s=round(elapsed, 2),
                eta_s=round(elapsed / done * (len(blocks) - done), 1),
                max_outlier_ratio=max((r.get("outlier_ratio", 0.0) for r in block_records), default=0.0),
                mean_relative_error=sum(r["relative_error"] for r in block_records) / max(len(block_records), 1),
                rss_bytes=memory.latest.rss_bytes, peak_rss_bytes=memory.peak)
        head = _quantize_head(model, grid, recipe)
        quantized = _assemble(model, blocks, qblocks, head, recipe)
        kernels.prepare(quantized.module, model.dtype)  # as a loaded folder does, so Chat's first step is not slower
        yield from memory.drain()
    summary = summarize(model, quantized, recipe, seconds=time.perf_counter() - started, peak_rss=memory.peak)
    return QuantizationResult(quantized, recipe, summary, list(records.values()))


def check_supported(model: DiffusionLM) -> None:
    """Refuse, before any work, a family the block-by-block quantizer cannot take, or weights it cannot."""
    if model.not_quantizable:
        raise QuantizationError(f"{model.source} ({model.family}) cannot be quantized: {model.not_quantizable}.")
    bad = nonfinite_tensors(model.module.named_parameters())
    if bad:  # they would poison the calibration activations and GPTQ's Hessians
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise QuantizationError(f"{model.source} cannot be quantized: tensor {bad[0]}{more} holds NaN or infinite "
                                "values. Repair or replace the checkpoint first.")


@dataclass
class _Progress:
    started: float
    total: int
    done: int = 0

    def advance(self) -> tuple[int, float, float]:
        """Count one layer done; (layers done, elapsed s, ETA s)."""
        self.done += 1
        elapsed = time.perf_counter() - self.started
        return self.done, round(elapsed, 2), round(elapsed / self.done * (self.total - self.done), 1)


def _quantize_block(work, layers, states, masks, grid, recipe, cancel, progress) -> Generator[Event, None, None]:
    """Quantize the linears of one block copy in place, yielding their events."""
    if not layers:
        return
    stats_done = recipe.method == "awq"  # AWQ reported them before its scales changed the inputs
    stages = [[n for n, l in layers.items() if l.role in roles] for roles in STAGES] if recipe.method == "gptq" else [list(layers)]
    stages.append([n for n in layers if not any(n in s for s in stages)])  # roles outside the known stages
    for stage in filter(None, stages):
        cancel.check()
        stage_layers = {n: layers[n] for n in stage}
        taps = _collect(work, stage_layers, states, masks, stats=not stats_done, hessian=recipe.method == "gptq")
        for name, layer in stage_layers.items():
            cancel.check()
            tap = taps[name]
            if tap.stats is not None:
                yield tap.stats.event(layer.name, layer.role, layer.block)
            t0 = time.perf_counter()
            linear = work.get_submodule(name)
            qlinear = _quantize_linear(linear, layer.role, tap, grid, recipe)
            error = _relative_error(linear, qlinear, tap.inputs())
            _set_submodule(work, name, qlinear)
            done, elapsed, eta = progress.advance()
            yield LayerQuantized(layer.name, layer.role, layer.block, recipe.wbits, round(error, 6),
                                 round(time.perf_counter() - t0, 3), done, progress.total, elapsed, eta)


def _quantize_linear(linear: nn.Linear, role: str, tap: _Tap | None, grid: Grid, recipe: QuantRecipe) -> nn.Module:
    """The method's codes for one layer; without calibration inputs (`tap` None) it rounds to nearest.
    A library method gets the library's module instead (its own rounding; inputs for activation scales)."""
    if recipe.method in runtimes.METHODS:
        return runtimes.convert(linear, recipe, None if tap is None else tap.inputs())
    w = linear.weight.detach().float()
    g_idx = None
    if recipe.method == "gptq" and tap is not None:
        q, scales, zeros, g_idx = gptq(w, tap.hessian.H, grid, recipe.group_size, damp=recipe.damp,
                                       act_order=recipe.act_order)
    elif recipe.method == "awq" and tap is not None and role not in awq.NO_CLIP_ROLES:
        clip = awq.search_clip(tap.inputs(), w, grid, recipe.group_size, torch.Generator(w.device).manual_seed(recipe.seed))
        q, scales, zeros = rtn(w, grid, recipe.group_size, clip)
    else:
        q, scales, zeros = rtn(w, grid, recipe.group_size)
    return QuantLinear.from_codes(q, scales, zeros, recipe.wbits, recipe.group_size, g_idx=g_idx,
                                  bias=None if linear.bias is None else linear.bias.detach())


def _apply_awq_scales(model, work, in_block, layers, states, masks, grid, recipe) -> Generator[Event, None, None]:
    """AWQ's first pass: report the block's input statistics, then search each stage's channel scales on
    the full-precision inputs and fold them into producer and consumers."""
    taps = _collect(work, layers, states, masks, stats=True)
    for name, tap in taps.items():
        yield tap.stats.event(layers[name].name, layers[name].role, layers[name].block)
    for first_role, producer_name in model.scale_producers.items():
        stage = next(roles for roles in STAGES if first_role in roles)
        readers = [n for n, l in layers.items() if l.role in stage]
        if not readers:
            continue
        # Every linear reading the producer gets the scale, skipped ones too (exactly, in full precision).
        consumers = [work.get_submodule(n) for n, l in in_block.items() if l.role in stage]
        producer = work.get_submodule(producer_name)
        width = consumers[0].in_features
        if producer.weight.shape[0] != width or any(c.in_features != width for c in consumers):
            continue  # e.g. v -> o under grouped-query attention: shapes do not line up, no exact fold
        s = awq.search_scale(taps[readers[0]].inputs(), [c.weight for c in consumers], grid, recipe.group_size)
        s = s.to(producer.weight.dtype)
        producer.weight.div_(s.view(-1, *([1] * (producer.weight.dim() - 1))))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s)
        for c in consumers:
            c.weight.mul_(s.to(c.weight.dtype))


def _collect(work, layers, states, masks, *, stats: bool = False, hessian: bool = False) -> dict[str, _Tap]:
    """Run the calibration states through the block with hooks on `layers`; return what they saw."""
    taps = {}
    current: list[torch.Tensor | None] = [None]
    handles = []
    for name in layers:
        module = work.get_submodule(name)
        tap = _Tap(InputStats(module.in_features) if stats else None,
                   Hessian(module.in_features, module.weight.device) if hessian else None)
        taps[name] = tap
        handles.append(module.register_forward_pre_hook(lambda m, args, tap=tap: tap.add(args[0], current[0])))
    try:
        for (args, kwargs), mask in zip(states, masks):
            current[0] = mask
            _run(work, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return taps


def _block_inputs(model: DiffusionLM, blocks: nn.ModuleList, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for each calibration batch (hidden states first)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in ids.split(BATCH):
            try:
                model.module(batch, None)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _relative_error(linear: nn.Linear, qlinear: nn.Module, x: torch.Tensor) -> float:
    reference = x @ linear.weight.detach().float().T
    if isinstance(qlinear, QuantLinear):
        approx = x @ qlinear.dequantize(torch.float32).T
    else:  # a library's module: its own forward (its kernels, its activation quantizers), less the bias
        approx = qlinear(x.to(linear.weight.dtype)).float()
        if linear.bias is not None:
            approx = approx - linear.bias.detach().float()
    return float((approx - reference).norm() / reference.norm().clamp_min(1e-12))


def _quantize_head(model: DiffusionLM, grid: Grid, recipe: QuantRecipe) -> dict[str, nn.Module]:
    """LM-head linears the recipe does not skip, rounded to nearest (their inputs lie outside the blocks)."""
    return {layer.name: _quantize_linear(model.module.get_submodule(layer.name), "head", None, grid, recipe)
            for layer in model.linear_layers() if layer.role == "head" and not recipe.skips(layer.name, layer.role)}


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
    config = {"quant_method": "dllm_studio", "method": recipe.method, "bits": recipe.wbits,
              "group_size": recipe.group_size or -1, "sym": recipe.symmetric, "desc_act": recipe.act_order,
              "skip": list(recipe.skip), "format": "packed-uint8"}
    # The activation grid is the layers' own (every layer shares it); a weight-only model's config is unchanged.
    layer = next((m for m in module.modules() if isinstance(m, QuantLinear)), None) if module is not None else None
    if layer is not None and layer.act_bits != 16:
        config.update(act_bits=layer.act_bits, act_clip=layer.act_clip)
    return config


def summarize(original: DiffusionLM, quantized: DiffusionLM, recipe: QuantRecipe, *, seconds: float,
              peak_rss: int) -> dict:
    qlayers = [m for m in quantized.module.modules() if isinstance(m, QuantLinear) or runtimes.method_of(m)]
    weights = sum(m.in_features * m.out_features for m in qlayers)
    packed = sum(m.nbytes() - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                 if isinstance(m, QuantLinear) else runtimes.stored_bytes(m) for m in qlayers)
    source_bytes = weights * original.dtype.itemsize
    widest = max((m.in_features for m in qlayers), default=None)
    return {
        "recipe": recipe.label, "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss,
        "quantized_layers": len(qlayers), "quantized_weights": weights,
        "bits_per_weight": round(packed * 8 / max(weights, 1), 4),
        "theory_bits_per_weight": round(theory_bits(recipe, widest if recipe.method in runtimes.METHODS else None,
                                                    original.dtype.itemsize * 8), 4),
        "linear_bytes_before": source_bytes, "linear_bytes_after": packed, "linear_bytes_bf16": weights * 2,
        "model_bytes_before": original.weight_bytes(), "model_bytes_after": quantized.weight_bytes(),
        "model_bytes_before_bf16": original.num_parameters() * 2,
    }


def working_set(model: DiffusionLM, recipe: QuantRecipe) -> dict[str, int]:
    """Bytes a quantization run needs, by part (for the memory preflight); `model` may live on meta."""
    linears = [l for l in model.linear_layers() if l.block is not None]
    per_block = max(sum(l.in_features * l.out_features for l in linears if l.block == b)
                    for b in {l.block for l in linears}) if linears else 0
    widest = max((l.in_features for l in linears), default=model.hidden_size)
    quantized = sum(l.in_features * l.out_features for l in linears if not recipe.skips(l.name, l.role))
    tokens = recipe.calib_samples * recipe.seq_len
    taps = min(tokens, SAMPLE_TOKENS) * widest * 4 * len({l.role for l in linears})
    hessians = 3 * widest * widest * 4 if recipe.method == "gptq" else 0
    return {
        "model": model.num_parameters() * model.dtype.itemsize,
        "quantized copy": int(quantized * theory_bits(recipe, widest, model.dtype.itemsize * 8) / 8),
        "one block at fp32": per_block * 4 * 2,  # the copy and GPTQ's working weights
        "calibration activations": tokens * model.hidden_size * 4 * 3 + taps + hessians,
    }


def theory_bits(recipe: QuantRecipe, in_features: int | None = None, dtype_bits: int = 16) -> float:
    """Bits per weight of the storage: the codes, plus a 16-bit scale and a `wbits` zero per group (a library
    method: its own layout, whose scales may be held at the model's `dtype_bits`)."""
    if recipe.method in runtimes.METHODS:
        return runtimes.theory_bits(recipe, in_features, dtype_bits)
    group = recipe.group_size or in_features
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


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _record(event) -> dict:
    if isinstance(event, LayerStats):
        return {"name": event.name, "role": event.role, "block": event.block, "outlier_ratio": event.outlier_ratio,
                "kurtosis": event.kurtosis, "massive": event.massive, "top_channels": event.top_channels,
                "masked_outlier_ratio": event.masked_outlier_ratio,
                "unmasked_outlier_ratio": event.unmasked_outlier_ratio}
    return {"relative_error": event.relative_error, "seconds": event.seconds}
