"""AWQ (Lin et al., arXiv:2306.00978): protect the weight columns that meet large activations.

For linears that read the same input X (q, k and v after the attention norm; gate and up after the
MLP norm; down after up), search s = mean|X|^alpha over alpha in {0, 0.05, ..., 0.95}, normalised by
sqrt(max s * min s), keeping the s whose quantized weights Q(W diag s) diag(s)^-1 give the smallest
output error against full precision. s is then folded exactly: its inverse into the producer (the
norm's gain or the producing linear's rows) and s into the consumers' columns. Finally every linear
except q and k gets a clip search: per output row and group, shrink the range to max * (1 - i/20),
i < 10, keeping the shrink with the smallest error on that group's share of the output.
"""

from __future__ import annotations

import torch

from dllm_studio.quant.grid import Grid, dequantize, group_slices, rtn

ALPHAS = [i / 20 for i in range(20)]
CLIP_SHRINKS = [1 - i / 20 for i in range(10)]
CLIP_TOKENS = 512  # tokens subsampled for the clip search (as llm-awq)
NO_CLIP_ROLES = ("q", "k")  # their errors are squashed by softmax; llm-awq skips them too


def fake_quant(w: torch.Tensor, grid: Grid, group_size: int | None) -> torch.Tensor:
    return dequantize(*rtn(w, grid, group_size), group_size)


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], grid: Grid, group_size: int | None) -> torch.Tensor:
    """The per-input-channel scale s (in,) that minimises the quantized outputs' error on inputs x (N, in)."""
    x = x.float()
    reference = torch.cat([x @ w.float().T for w in weights], dim=1)
    x_mean = x.abs().mean(0)
    best, best_err = torch.ones_like(x_mean), float("inf")
    for alpha in ALPHAS:
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = torch.cat([x @ (fake_quant(w.float() * s, grid, group_size) / s).T for w in weights], dim=1)
        err = (out - reference).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, grid: Grid, group_size: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per (output row, group) range shrink in CLIP_SHRINKS minimising that group's output error.

    Returns clip (out, groups) for `grid.params`.
    """
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
            scale, zero = grid.params(wg, shrink)
            err = (xg @ grid.fake(wg, scale, zero).T - reference).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            clip[better, g] = shrink
    return clip
