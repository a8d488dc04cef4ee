"""AWQ (Lin et al., arXiv:2306.00978): protect the weight columns that meet large activations.

For linears that read the same input X (q, k and v after the attention norm; gate and up after the
MLP norm; down after up), search s = mean|X|^alpha over alpha in {0, 0.05, ..., 0.95}, normalised by
sqrt(max s * min s), keeping the s whose quantized weights Q(W diag s) diag(s)^-1 give the smallest
output error against full precision. s is then folded exactly: its inverse into the producer (the
norm's gain or the producing linear's rows) and s into the consumers' columns. Finally every linear
except q and k gets a clip search: per output row and group, shrink the range to max * (1 - i/20),
i < 10, keeping the shrink with the smallest error on that group's share of the output.

Both searches check their cancel token per candidate and per slice of output rows: on an 8B's MLP one α
candidate costs two 4096 x 4096 x 12288 products, tens of seconds on a laptop's cores.
"""

from __future__ import annotations

import torch

from dllm_studio.events import CancelToken
from dllm_studio.quant.grid import Grid, dequantize, group_slices, rtn

ALPHAS = [i / 20 for i in range(20)]
CLIP_SHRINKS = [1 - i / 20 for i in range(10)]
CLIP_TOKENS = 512  # tokens subsampled for the clip search (as llm-awq)
NO_CLIP_ROLES = ("q", "k")  # their errors are squashed by softmax; llm-awq skips them too
CHUNK_MACS = 1 << 31  # multiply-adds of one slice of output rows between cancel checks (well under a second)


def fake_quant(w: torch.Tensor, grid: Grid, group_size: int | None) -> torch.Tensor:
    return dequantize(*rtn(w, grid, group_size), group_size)


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], grid: Grid, group_size: int | None, *,
                 cancel: CancelToken | None = None) -> torch.Tensor:
    """The per-input-channel scale s (in,) that minimises the quantized outputs' error on inputs x (N, in)."""
    cancel = cancel or CancelToken()
    x = x.float()
    rows = max(1, CHUNK_MACS // (x.shape[0] * x.shape[1]))
    # The reference outputs, by slice of each weight's rows, so each candidate's error is summed slice by slice.
    references = []
    for w in weights:
        for chunk in w.split(rows):
            cancel.check()
            references.append(x @ chunk.float().T)
    outputs = sum(r.numel() for r in references)
    x_mean = x.abs().mean(0)
    best, best_err = torch.ones_like(x_mean), float("inf")
    for alpha in ALPHAS:
        cancel.check()
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err, reference = 0.0, iter(references)
        for w in weights:
            for chunk in w.split(rows):  # rows round alone: a slice at a time, never a whole scaled fp32 copy
                cancel.check()
                scaled = fake_quant(chunk.float() * s, grid, group_size) / s
                err += float((x @ scaled.T - next(reference)).pow(2).sum())
        if err / outputs < best_err:
            best, best_err = s, err / outputs
    return best


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, grid: Grid, group_size: int | None,
                generator: torch.Generator | None = None, *, cancel: CancelToken | None = None) -> torch.Tensor:
    """Per (output row, group) range shrink in CLIP_SHRINKS minimising that group's output error.

    Returns clip (out, groups) for `grid.params`.
    """
    cancel = cancel or CancelToken()
    x = x.float()
    if x.shape[0] > CLIP_TOKENS:
        x = x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:CLIP_TOKENS]]
    w = w.float()
    slices = group_slices(w.shape[1], group_size)
    clip = torch.ones(w.shape[0], len(slices), device=w.device)
    for g, cols in enumerate(slices):
        wg, xg = w[:, cols], x[:, cols]
        reference = xg @ wg.T  # (N, out): this group's share of every output
        best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
        for shrink in CLIP_SHRINKS:
            cancel.check()
            scale, zero = grid.params(wg, shrink)
            err = (xg @ grid.fake(wg, scale, zero).T - reference).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            clip[better, g] = shrink
    return clip
