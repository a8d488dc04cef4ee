"""What a quantization method is to the pipeline, which keeps the block loop and knows no method by name.

A method (one module under `quant.methods`, a row of its table) says
- which calibration it needs: GPTQ's Hessians (`hessian`), and the stages in which a block's linears are
  captured and rounded (`stages`: GPTQ rounds q/k/v before o sees their quantized outputs);
- optionally, how it changes each block copy before rounding (`prepare_block`: AWQ's and SmoothQuant's
  channel scales, QuaRot's and DuQuant's rotations), given taps of the untouched block's inputs; a method
  that changes what the linears see (`Spec.transforms`) has that change reported before and after;
- optionally, how it changes the residual stream entering the blocks and the modules outside them
  (`hidden_states`, `outside`: QuaRot rotates the embedding and the head);
- how it rounds one linear (`round`), into a `QuantLinear` (or a library's module).
A method gets the run's cancel token (`self.cancel`) and checks it inside its searches, passing it on to the
solvers (`gptq`, `capture.collect`), so a Cancel takes effect within a second of work, not after a layer.
The pipeline copies blocks, runs calibration through them (`quant.capture`), emits the events and
assembles the model; a method never sees the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dllm_studio.events import CancelToken
from dllm_studio.models.base import DiffusionLM, LinearLayer
from dllm_studio.quant.capture import Tap
from dllm_studio.quant.grid import Grid, rtn
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe

ROUND_ELEMENTS = 1 << 24  # weights rounded between cancel checks: an LM head's 4096 rows of 4096 (it has 126464),
# a down projection's 1365 rows of 12288, so its rounding temporaries are a few 64 MB chunks, not whole fp32 copies


def row_chunks(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`w` (out, in) in chunks of whole rows of about ROUND_ELEMENTS weights each."""
    return w.split(max(1, ROUND_ELEMENTS // max(1, w.shape[1])))


def by_rows(round_rows, w: torch.Tensor, *aligned: torch.Tensor) -> list[torch.Tensor]:
    """`round_rows(rows, *their rows of aligned)` per chunk of `row_chunks(w)`, each of its results concatenated:
    the same as one call on all of `w` when every row rounds alone, with temporaries of a chunk."""
    chunks = row_chunks(w)
    rows = chunks[0].shape[0] if chunks else 1
    parts = [round_rows(chunk, *others) for chunk, *others in zip(chunks, *(a.split(rows) for a in aligned))]
    return [torch.cat(tensors) for tensors in zip(*parts)]


def stage_of(layer) -> int | str:
    """The index in STAGES of the stage `layer` belongs to (linears of one stage read one input); else its name."""
    return next((i for i, roles in enumerate(STAGES) if layer.role in roles), layer.name)
# GPTQ's sequential stages inside a block, by role: each reads what the stages before it produce.
STAGES = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))


@dataclass
class Block:
    """One block as a method sees it while it works on the block's copy."""

    index: int
    module: nn.Module  # the working copy; a method changes it in place
    layers: dict[str, LinearLayer]  # local name -> layer: the linears the recipe quantizes
    linears: dict[str, LinearLayer]  # every linear of the block, skipped ones too (an exact fold reaches them all)
    collect: Callable[..., dict[str, Tap]]  # collect(names, stats=, hessian=): calibration through the copy as it is now


class Method:
    hessian: ClassVar[bool] = False
    stages: ClassVar[tuple[tuple[str, ...], ...] | None] = None  # None: every linear at once

    def __init__(self, model: DiffusionLM, recipe: QuantRecipe, cancel: CancelToken | None = None) -> None:
        self.model, self.recipe = model, recipe
        self.cancel = cancel or CancelToken()
        # Weight-and-activation settings round weights per output channel on a symmetric grid, which integer
        # kernels take with per-token activation scales; weight-only ones use the recipe's groups and grid.
        per_channel = recipe.per_channel
        self.grid = Grid(recipe.wbits, recipe.symmetric or per_channel)
        self.group_size = None if per_channel else recipe.group_size

    @property
    def transforms(self) -> bool:
        """Whether it changes the linears' inputs (the table says: `Spec.transforms`); LayerTransformed events
        then report them before and after."""
        return self.recipe.spec.transforms

    @classmethod
    def working_bytes(cls, model: DiffusionLM, layers: list[LinearLayer]) -> dict[str, int]:
        """Bytes the method adds to a run beyond the pipeline's own (by part, for the memory preflight), given
        the linears it quantizes; `model` may live on meta."""
        return {}

    def search_cost(self, layers: list[LinearLayer], rows: int) -> float:
        """Work of `prepare_block` over one block's `layers` with `rows` sampled tokens, in multiply-adds of a
        blocked matmul (the run's progress weighs it by this, `quant.progress`): by default one pass of the rows
        through every linear."""
        return rows * sum(l.in_features * l.out_features for l in layers)

    def round_cost(self, layer: LinearLayer, rows: int) -> float:
        """Work of `round` on one linear, in the same units: by default one pass over its weights."""
        return layer.in_features * layer.out_features

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block, as the method's model will see it."""
        return x

    def plain_states(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `hidden_states`: the stream as the original model's blocks read it."""
        return x

    def prepare_block(self, block: Block, taps: dict[str, Tap]) -> Iterable | None:
        """Change the block copy before rounding; `taps` hold the untouched block's inputs (statistics and
        samples) for every linear in `block.layers`. May yield events. Called only where a method defines it."""
        return None

    def transform_label(self, name: str) -> tuple[str, str]:
        """(what the change of basis of linear `name` is, why it was chosen) for LayerTransformed events."""
        return "", ""

    def round(self, linear: nn.Linear, layer: LinearLayer, tap: Tap | None) -> nn.Module:
        """The quantized form of one linear; `tap` holds its (transformed) calibration inputs, None for the
        LM head, whose inputs lie outside the blocks."""
        return self.quant_linear(linear, *self.round_to_nearest(linear.weight.detach()))

    def round_to_nearest(self, w: torch.Tensor) -> list[torch.Tensor]:
        """(q, scales, zeros) of round-to-nearest on the method's grid, a chunk of rows at a time (`row_chunks`)
        with a cancel check before each: every row is rounded on its own, so the codes are those of one call."""
        def round_rows(rows):
            self.cancel.check()
            return rtn(rows.float(), self.grid, self.group_size)

        return by_rows(round_rows, w)

    def at_bits(self, bits: int) -> Method:
        """This method rounding onto a `bits`-bit grid (a mixed-precision plan's layer, `quant.budget`): a sibling
        on the same model whose recipe differs only in `wbits`, made once per bit-width. Only `round` is asked of
        it; what `prepare_block` searched (AWQ's scales) was searched at the recipe's own bits."""
        if bits == self.recipe.wbits:
            return self
        siblings = self.__dict__.setdefault("_siblings", {})
        if bits not in siblings:
            siblings[bits] = type(self)(self.model, dataclasses.replace(self.recipe, wbits=bits, layer_bits=()),
                                        self.cancel)
        return siblings[bits]

    def outside(self) -> dict[str, nn.Module]:
        """Replacements for modules outside the blocks (qualified name -> module), before the head is rounded."""
        return {}

    def quant_linear(self, linear: nn.Linear, q, scales, zeros, *, g_idx=None) -> QuantLinear:
        """A QuantLinear from integer codes, with the recipe's activation quantization."""
        bias = None if linear.bias is None else linear.bias.detach()
        return QuantLinear.from_codes(q, scales, zeros, self.recipe.wbits, self.group_size, g_idx=g_idx, bias=bias,
                                      **self.activations())

    def codebook_linear(self, linear: nn.Linear, codes, codebook) -> QuantLinear:
        """A QuantLinear whose codes index a per-row codebook of levels (non-uniform grids)."""
        bias = None if linear.bias is None else linear.bias.detach()
        return QuantLinear.from_codebook(codes, codebook, self.recipe.wbits, bias=bias, **self.activations())

    def activations(self) -> dict:
        """How the quantized layers round their inputs: per-token dynamic, at the recipe's bits and clip."""
        if self.recipe.abits == 16:
            return {}
        return {"act_bits": self.recipe.abits, "act_clip": self.recipe.activation_clip}


def scale_groups(model: DiffusionLM, block: Block):
    """(producer module, consumer linears, quantized reader names) for each stage of `block` whose input is
    one module's output that per-channel scales can be folded into exactly: a norm's gain, or the rows of the
    linear producing it (`model.scale_producers`). Every linear reading the producer is a consumer, skipped
    ones too, so the fold leaves the block's full-precision output unchanged."""
    for first_role, producer_name in model.scale_producers.items():
        stage = next(roles for roles in STAGES if first_role in roles)
        readers = [n for n, l in block.layers.items() if l.role in stage]
        if not readers:
            continue
        consumers = [block.module.get_submodule(n) for n, l in block.linears.items() if l.role in stage]
        producer = block.module.get_submodule(producer_name)
        width = consumers[0].in_features
        if producer.weight.shape[0] != width or any(c.in_features != width for c in consumers):
            continue  # e.g. v -> o under grouped-query attention: shapes do not line up, no exact fold
        yield producer, consumers, readers


def smoothing(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|X_j|^α / max|W_:,j|^(1-α), the weight maximum over every linear
    reading the input: X / s and W·diag(s) even out the activations' channels (α = 0: nothing moves)."""
    w = torch.cat([weight.detach().abs().float() for weight in weights]).amax(0)
    return (absmax.to(w.device).clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


def fold_scales(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide the producer's output channels by s and multiply the consumers' input columns by it."""
    s = s.to(producer.weight.dtype)
    producer.weight.div_(s.view(-1, *([1] * (producer.weight.dim() - 1))))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s)
    for c in consumers:
        c.weight.mul_(s.to(c.weight.dtype))
