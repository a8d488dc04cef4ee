"""GPTQ (Frantar et al., arXiv:2210.17323): round columns one at a time, pushing each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

H = 2/N * sum_t x_t x_t^T over the calibration tokens that reach the layer. The solver follows the
reference implementation (IST-DASLab/gptq): dead inputs get zero weight, H is dampened by a fraction
of its mean diagonal, columns are swept in blocks of 128 with the block's error propagated to the
later columns at once, and each group's scale and zero point are fixed from the error-updated
columns when the sweep reaches the group. Act-order sweeps columns by decreasing H_ii and records
each column's group in `g_idx`.
"""

from __future__ import annotations

import torch

from dllm_studio.quant.grid import Grid

BLOCK = 128


class Hessian:
    """Running 2/N * X^T X of a layer's inputs, accumulated batch by batch (N = tokens seen)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * (2 / self.tokens) ** 0.5
        self.H.addmm_(x.T, x)


def gptq(w: torch.Tensor, H: torch.Tensor, grid: Grid, group_size: int | None, *, damp: float = 0.01,
         act_order: bool = False):
    """Quantize w (out, in) given its inputs' Hessian H (in, in).

    Returns (q, scales, zeros, g_idx): integer codes (out, in) in the original column order, per-group
    scales and zeros (out, groups), and each column's group (None without act-order).
    """
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    out_features, n = W.shape
    size = group_size or n
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)

    groups = -(-n // size)
    Q = torch.zeros_like(W)
    scales = torch.zeros(out_features, groups, device=W.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:  # a new group: its range from the columns as the sweep has updated them
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :size]
                scale, zero = grid.params(ahead)
                scales[:, col // size], zeros[:, col // size] = scale, zero
            w_col = W1[:, i]
            q = grid.quantize(w_col[:, None], scale, zero)[:, 0]
            Q[:, col] = q
            err = (w_col - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        g_idx = (inverse // size).to(torch.int32)  # column c sat at position inverse[c] of the sweep
    return Q.to(torch.uint8), scales, zeros, g_idx


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dampening harder if H is singular."""
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(6):
        damped = H + (damp * 10 ** attempt) * mean_diag * torch.eye(n, device=H.device)
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return U
    raise ValueError("the layer's input Hessian is not positive definite even after heavy dampening")
