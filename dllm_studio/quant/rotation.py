"""Orthogonal rotations that flatten activation outliers before rounding: Hadamard (QuaRot) and DuQuant's blocks.

Every map here acts on rows, z -> z R with R orthogonal, so a linear layer keeps its output when its weight gets
the same map (see `transforms.InputTransform`); what changes is how evenly the channels share the magnitude.

Hadamard: H_n = F ⊗ H_{2^k} for n = m·2^k, with F the (m, m) ±1 factor of `hadamard_factor` and H_{2^k}
Sylvester's. The index of channel i splits as i = a·2^k + r (a the factor's index, r the power of two's), so
`hadamard_transform` runs a fast Walsh–Hadamard transform over r and one (m, m) matmul over a. F comes from the
Paley constructions; sizes without one (odd part o with no Paley order among 4o, 8o, ... dividing n, e.g.
184 = 23·8) get a fixed random orthogonal (o, o) factor instead, scaled by √o: the map stays orthogonal but that
part is a rotation, not a Hadamard (`is_hadamard` says which).

DuQuant (arXiv:2406.01721): a greedy block-diagonal rotation, a zigzag permutation, and a second rotation.
"""

from __future__ import annotations

import functools
import math

import torch

from dllm_studio.errors import QuantizationError
from dllm_studio.events import CancelToken

FALLBACK_SEED = 0  # the random orthogonal factor must be the same in every run: checkpoints store only the size


# ---------------------------------------------------------------- Hadamard matrices

def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), the quadratic character mod the prime q (χ(0) = 0)."""
    residues = torch.zeros(q)
    residues[torch.tensor(sorted({x * x % q for x in range(1, q)}))] = 1
    chi = 2 * residues - 1
    chi[0] = 0
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 mod 4, where Q is antisymmetric: [[1, 1ᵀ], [−1, Q + I]]."""
    h = torch.ones(q + 1, q + 1)
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + torch.eye(q)
    return h


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 mod 4, where Q is symmetric: in C = [[0, 1ᵀ], [1, Q]] every 0 becomes
    [[1, −1], [−1, −1]] and every ±1 becomes ±[[1, 1], [1, −1]]."""
    c = torch.ones(q + 1, q + 1)
    c[0, 0] = 0
    c[1:, 1:] = _jacobsthal(q)
    zero, one = torch.tensor([[1.0, -1], [-1, -1]]), torch.tensor([[1.0, 1], [1, -1]])
    return torch.kron(c, one) + torch.kron((c == 0).float(), zero)


def _paley(m: int) -> torch.Tensor | None:
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def _random_orthogonal(m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(FALLBACK_SEED)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # QR's sign freedom fixed, so the factor is unique


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> tuple[torch.Tensor, bool]:
    if n < 1:
        raise QuantizationError(f"A Hadamard rotation needs a positive size, not {n}.")
    odd = n // (n & -n)
    if odd == 1:
        return torch.ones(1, 1), True
    m = 4 * odd  # a Hadamard order > 2 is a multiple of 4: try the smallest first
    while n % m == 0:
        if (h := _paley(m)) is not None:
            return h, True
        m *= 2
    return (_random_orthogonal(odd) * math.sqrt(odd)).float().contiguous(), False


def hadamard_factor(n: int) -> torch.Tensor:
    """The (m, m) fp32 ±1 Hadamard factor of n = m·2^k with the smallest constructible m (1 for a power of two),
    or, where no Paley order divides n, a fixed random orthogonal (o, o) matrix scaled by √o, o the odd part."""
    return _factor(n)[0].clone()


def is_hadamard(n: int) -> bool:
    """Whether `hadamard_factor(n)` is a true Hadamard matrix (False: the random orthogonal fallback)."""
    return _factor(n)[1]


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.kron(torch.tensor([[1.0, 1], [1, -1]]), h)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense orthonormal (n, n) fp32 matrix (F ⊗ H_{2^k}) / √n that `hadamard_transform` applies."""
    factor = _factor(n)[0]
    return torch.kron(factor.double(), _sylvester(n // factor.shape[0]).double()).div(math.sqrt(n)).float()


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """QuaRot's randomised Hadamard diag(±1) · hadamard_matrix(n), dense (n, n) fp32, signs drawn from generator."""
    signs = torch.randint(0, 2, (n,), generator=generator, device=generator.device).cpu().float() * 2 - 1
    return signs[:, None] * hadamard_matrix(n)


def _walsh_hadamard(z: torch.Tensor) -> torch.Tensor:
    """z (rows, p) @ H_p, unnormalised, p a power of two: log2(p) butterfly passes, one per index bit h, each
    turning the pairs (i, i + h) of every run of 2h into (a + b, a − b)."""
    p = z.shape[-1]
    # Memory-bound: write each pass into one of two reused buffers; autograd cannot follow out=, so then allocate.
    tracked = torch.is_grad_enabled() and z.requires_grad
    buffers = None if tracked else (torch.empty_like(z), torch.empty_like(z))
    h, turn = p // 2, 0
    while h >= 1:
        pairs = z.view(-1, 2, h)
        a, b = pairs[:, 0], pairs[:, 1]
        if tracked:
            z = torch.stack((a + b, a - b), dim=1).view(-1, p)
        else:
            out = buffers[turn].view(-1, 2, h)
            torch.add(a, b, out=out[:, 0])
            torch.sub(a, b, out=out[:, 1])
            z, turn = buffers[turn], 1 - turn
        h //= 2
    return z


def hadamard_transform(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x (..., n) @ hadamard_matrix(n), in x's dtype, without building the (n, n) matrix: a fast Walsh–Hadamard
    transform over the power-of-two index and one matmul with `factor` (m, m) over the other."""
    n, m = x.shape[-1], factor.shape[0]
    if n % m or (p := n // m) & (p - 1):
        raise QuantizationError(f"A Hadamard factor of order {m} does not fit an input of {n} channels.")
    z = _walsh_hadamard(x.reshape(-1, p).contiguous()).view(-1, m, p)
    scaled = (factor.T / math.sqrt(n)).to(device=x.device, dtype=x.dtype)
    # y[b, r] = Σ_a F[a, b] z[a, r] / √n: an (m, m) @ (m, p) product per row, contiguous in and out
    z = z * scaled if m == 1 else torch.matmul(scaled, z)
    return z.reshape(x.shape)


# ---------------------------------------------------------------- block rotations (DuQuant)

def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., n) @ block_diag(*blocks) for blocks (nb, b, b), n = nb·b, one batched matmul per block."""
    nb, b, _ = blocks.shape
    if x.shape[-1] != nb * b:
        raise QuantizationError(f"{nb} rotation blocks of {b} channels do not fit an input of {x.shape[-1]} channels.")
    z = x.reshape(-1, nb, b).transpose(0, 1)  # (nb, tokens, b)
    z = torch.bmm(z, blocks.to(device=x.device, dtype=x.dtype))
    return z.transpose(0, 1).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _helmert(b: int) -> torch.Tensor:
    """Orthogonal (b, b), float64, first row 1/√b: row k > 0 is (1, …, 1, −k, 0, …)/√(k(k+1)) with k ones.

    It plays the part of DuQuant's precomputed Givens chain (cos = 1/√(i+2)), whose first row is 1/√b too, in
    closed form: e_0 H spreads channel 0 evenly over the block, while e_j H for j > 0 keeps most of channel j where
    it was, so one step moves mainly the outlier. (On planted outliers both reach about the same peaks.)"""
    h = torch.zeros(b, b, dtype=torch.float64)
    h[0] = 1 / math.sqrt(b)
    for k in range(1, b):
        h[k, :k] = 1 / math.sqrt(k * (k + 1))
        h[k, k] = -k / math.sqrt(k * (k + 1))
    return h


def _check_blocks(n: int, block: int) -> None:
    if block < 1 or n % block:
        raise ValueError(f"{n} channels do not split into blocks of {block}: DuQuant needs n divisible by the block.")


def greedy_rotation(absmax: torch.Tensor, block: int = 128, steps: int = 256,
                    sample: torch.Tensor | None = None, cancel: CancelToken | None = None) -> torch.Tensor:
    """DuQuant's greedy rotation R̂: block-diagonal (n // block, block, block), fp32, orthonormal.

    Each block, independently, repeats: take the channel c holding the block's largest |value|, swap it with
    channel 0 and apply the Helmert matrix, which spreads c's energy evenly over the block (so a step is
    P_{0c}·H). Of the `steps` accumulated rotations (and the identity), each block keeps the prefix whose rotated
    statistic has the smallest peak max|value|. The statistic is `sample` (tokens, n) of real activations when
    given (what the methods pass: the peak of sample @ R over tokens and channels), otherwise the magnitude
    vector absmax (n,), a proxy, since |x| R is not |x R|. `cancel` is checked every step.
    """
    x = (absmax[None] if sample is None else sample.reshape(-1, sample.shape[-1])).detach().float()
    n = x.shape[-1]
    _check_blocks(n, block)
    nb = n // block
    helmert = _helmert(block).to(x.device)
    z = x.reshape(-1, nb, block).transpose(0, 1).contiguous()  # (nb, tokens, block)
    rot = torch.eye(block, dtype=torch.float64, device=x.device).repeat(nb, 1, 1)  # float64: 256 products stay orthogonal
    best, best_peak = rot.clone(), z.abs().amax((1, 2))
    identity = torch.arange(block, device=x.device).repeat(nb, 1)
    for _ in range(steps):
        if cancel is not None:
            cancel.check()
        c = z.abs().amax(1).argmax(1)  # (nb,) each block's outlier channel
        order = identity.clone()
        order[:, 0] = c
        order.scatter_(1, c[:, None], 0)  # columns 0 and c exchanged (no-op where c = 0)
        z = torch.matmul(z.gather(2, order[:, None, :].expand_as(z)), helmert.float())
        rot = torch.matmul(rot.gather(2, order[:, None, :].expand_as(rot)), helmert)
        peak = z.abs().amax((1, 2))
        better = peak < best_peak
        best[better], best_peak = rot[better], torch.minimum(peak, best_peak)
    return best.float()


def zigzag_permutation(absmax: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DuQuant's zigzag: int64 (n,) column order (use as z[..., perm]) dealing channels, largest first, to blocks
    0, 1, …, K−1, K−1, …, 0, 0, 1, …, so every block gets a like share of the outliers. Within a block the channels
    stay sorted, largest first."""
    n = absmax.shape[-1]
    _check_blocks(n, block)
    k = n // block
    order = torch.argsort(absmax.detach().float().cpu(), descending=True, stable=True)
    rank = torch.arange(n)
    lap = rank % (2 * k)
    target = torch.where(lap < k, lap, 2 * k - 1 - lap) * block + rank // k  # block, then slot within it
    perm = torch.empty(n, dtype=torch.int64)
    perm[target] = order
    return perm.to(absmax.device)


def duquant(sample: torch.Tensor, block: int = 128, steps: int = 256, cancel: CancelToken | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DuQuant transform (R̂1, perm, R̂2) of real activations sample (tokens, n): the activation map is
    z -> block_rotate(block_rotate(z, R̂1)[..., perm], R̂2)."""
    x = sample.reshape(-1, sample.shape[-1]).detach().float()
    rotation1 = greedy_rotation(x.abs().amax(0), block, steps, sample=x, cancel=cancel)
    rotated = block_rotate(x, rotation1)
    perm = zigzag_permutation(rotated.abs().amax(0), block)
    permuted = rotated[:, perm]
    rotation2 = greedy_rotation(permuted.abs().amax(0), block, steps, sample=permuted, cancel=cancel)
    return rotation1, perm, rotation2


# ---------------------------------------------------------------- statistics (LRQ-DiT ARS)

def fluctuation(x: torch.Tensor) -> float:
    """LRQ-DiT's ARS switch J = ‖X‖_F / √numel, the RMS of the activations: Hadamard below a threshold, DuQuant above."""
    return float(x.detach().double().norm() / math.sqrt(max(x.numel(), 1)))


def kurtosis_of_rms(x: torch.Tensor) -> float:
    """mean_j s_j⁴ / (mean_j s_j²)² with s_j = √(mean_t x_tj²), for x (tokens, n): the profile's kurtosis."""
    from dllm_studio.profile import InputStats  # the one definition; profile imports the model layer, so late

    stats = InputStats(x.shape[-1])
    stats.add(x.reshape(-1, x.shape[-1]))
    return stats.kurtosis()
