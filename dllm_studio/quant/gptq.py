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

from dllm_studio.events import CancelToken
from dllm_studio.quant.grid import Grid

BLOCK = 128
# The solver's phases in multiply-adds of a blocked matmul (`solver_cost`), from their times measured apart on
# LLaDA-8B's shapes (2 AVX2 cores): the three LAPACK factorizations took about one in^3 between them, the error
# pushed onward a block at a time out x in^2, and each column's update of the rest of its BLOCK columns,
# elementwise and memory-bound, as much a weight as a matmul 12k wide (q: 1.6 s factoring, 5.4 s sweeping; down:
# 36 s and 24 s). With the error report on 1024 rows they put q / gate / down at 7.2 / 19 / 61 s against the
# measured 7.6 / 22.7 / 62 (a down projection 8.2 q's; without the sweep's term, in^3 at a third, 11.8).
FACTORIZATION = 1.0
COLUMN_SWEEP = 12_000


CHUNK = 1024  # rows of a 16-bit batch converted to float at a time (a whole batch at fp32 is 8 x 256 x in x 4 bytes)


class Hessian:
    """Running 2/N * X^T X of a layer's inputs, accumulated in float32 batch by batch (N = tokens seen)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        n = x.shape[0]
        self.H.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        scale = (2 / self.tokens) ** 0.5
        for rows in x.split(CHUNK):
            rows = rows.float() * scale
            self.H.addmm_(rows.T, rows)

    def take(self) -> torch.Tensor:
        """H, handed over: the accumulator lets go of it, so a solver that consumes it holds the only copy."""
        H, self.H = self.H, None
        return H


def gptq(w: torch.Tensor, H: torch.Tensor, grid: Grid, group_size: int | None, *, damp: float = 0.01,
         act_order: bool = False, consume: bool = False, cancel: CancelToken | None = None):
    """Quantize w (out, in) given its inputs' Hessian H (in, in).

    Returns (q, scales, zeros, g_idx): integer codes (out, in) in the original column order, per-group
    scales and zeros (out, groups), and each column's group (None without act-order). With `consume`, H
    (float32) is overwritten and dropped as soon as it is factored: the caller must not read it again, and
    should hold no other reference to it (`Hessian.take`) for its memory to go early. `cancel` is checked
    before the factorization and once per block of BLOCK columns (on an 8B's down projection, about a second each).
    """
    cancel = cancel or CancelToken()
    cancel.check()
    W = w.detach().to(torch.float32, copy=True)
    H = H.detach() if consume and H.dtype == torch.float32 else H.detach().to(torch.float32, copy=True)
    out_features, n = W.shape
    size = group_size or n
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm]  # two steps, so the reordered copy and its source are never three at once
        H = H[:, perm]
    Hinv = _inverse_cholesky(H, damp, cancel)
    del H

    groups = -(-n // size)
    Q = torch.zeros(out_features, n, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(out_features, groups, device=W.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, n, BLOCK):
        cancel.check()
        i2 = min(i1 + BLOCK, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:  # a new group: its range from the columns as the sweep has updated them
                ahead = torch.cat([W1[:, i:], W[:, i2:i2 + size]], dim=1)[:, :size]
                scale, zero = grid.params(ahead)
                scales[:, col // size], zeros[:, col // size] = scale, zero
            w_col = W1[:, i]
            q = grid.quantize(w_col[:, None], scale, zero)[:, 0]
            Q[:, col] = q  # whole codes in [0, 2^bits), exact in uint8
            err = (w_col - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    del W, Hinv

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        g_idx = (inverse // size).to(torch.int32)  # column c sat at position inverse[c] of the sweep
    return Q, scales, zeros, g_idx


def solver_cost(n_in: int, n_out: int) -> float:
    """The work of `gptq` on an (n_out, n_in) weight, for the run's progress (`quant.progress`)."""
    return n_out * n_in * (n_in + COLUMN_SWEEP) + FACTORIZATION * n_in ** 3


def _inverse_cholesky(H: torch.Tensor, damp: float, cancel: CancelToken | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dampening harder if H is singular.

    Done in place: H becomes the factor, so the solver holds H and a packed copy of its strict upper triangle
    (half of H, to start again from after a failed factorization) instead of three n x n matrices; for an 8B's
    12288-wide down projection that is 0.9 GB rather than 1.8 GB. The factor comes back as a column-major view
    of H's storage: LAPACK works in place only on column-major matrices (torch copies a row-major one first),
    and a symmetric H is its own column-major view. `cancel` is checked between the LAPACK calls (each takes
    seconds for an 8B's 12288-wide down projection, and none can be interrupted)."""
    cancel = cancel or CancelToken()
    diag = H.diagonal()
    undamped = diag.clone()
    mean_diag = torch.mean(undamped)
    upper = _pack_upper(H)
    F = H.mT
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(6):
        if attempt:
            _unpack_symmetric(upper, H)
        torch.add(undamped, (damp * 10 ** attempt) * mean_diag, out=diag)
        cancel.check()
        torch.linalg.cholesky_ex(F, out=(F, info))
        if info != 0:
            continue
        cancel.check()
        torch.cholesky_inverse(F, out=F)
        cancel.check()
        torch.linalg.cholesky_ex(F, upper=True, out=(F, info))
        if info == 0:
            return F
    raise ValueError("the layer's input Hessian is not positive definite even after heavy dampening")


def _pack_upper(H: torch.Tensor) -> torch.Tensor:
    """H's strict upper triangle, row by row, in one flat tensor."""
    n = H.shape[0]
    packed = torch.empty(n * (n - 1) // 2, dtype=H.dtype, device=H.device)
    start = 0
    for i in range(n - 1):
        packed[start:start + n - 1 - i] = H[i, i + 1:]
        start += n - 1 - i
    return packed


def _unpack_symmetric(packed: torch.Tensor, H: torch.Tensor, tile: int = 1024) -> None:
    """Write the symmetric matrix whose strict upper triangle is `packed` into H, off the diagonal."""
    n = H.shape[0]
    start = 0
    for i in range(n - 1):
        H[i, i + 1:] = packed[start:start + n - 1 - i]
        start += n - 1 - i
    for j0 in range(0, n, tile):  # the lower triangle mirrors the upper, a tile of columns at a time
        j1 = min(j0 + tile, n)
        H[j0:j1, :j0] = H[:j0, j0:j1].T
        block = H[j0:j1, j0:j1]
        block.copy_(block.triu(1) + block.triu(1).T + torch.diag(block.diagonal()))
