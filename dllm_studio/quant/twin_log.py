"""Twin-log weight quantization (TLQ, LRQ-DiT): two log2 grids per output row, one per sign.

Weights are Gaussian-like with long tails, so a uniform grid spends most of its levels where few weights
lie. TLQ rounds L = log2(|w| + eta) instead, on a uniform grid of 2^(b-1) levels per sign and row, whose
minimum is the side's true minimum and whose maximum a percentile of it; ŵ = ±(2^deq(L) - eta). eta and
the two percentiles are searched per row for the least mean squared weight error.

The result is a per-row codebook (out, 2^b) fp16 of the decoded levels: codes 0 .. 2^(b-1) - 1 are the
negative side's levels from the most negative in, codes 2^(b-1) .. 2^b - 1 the positive side's from the
smallest out. The codes are TLQ's own log-domain rounding, so decoding is a gather and exact. (The rounded
zero point can put a side's lowest log level below its minimum, so that level may decode to a tiny value of
the other sign, as it does in TLQ.)

Differences from the LRQ-DiT code, and why:
- eta is measured in units of the row's RMS: eta * rms / 0.02. LRQ-DiT's etas are absolute, for DiT
  weights of about the usual initialisation scale (std 0.02), which LLM weights share; the searched values
  then run from a pure log grid (0) to almost a uniform one (0.5 = 25 x the RMS). In RMS units a row's grid no
  longer depends on its scale. Measured on 256 x 1024 rows at 3 bits, MSE / RTN's: Student-t(3) x 0.02:
  0.338 (absolute 0.333, relative to max|w| 0.337); Gaussian x 0.02: 0.618 (0.617, 0.653); Gaussian x 1:
  0.599 (absolute 0.784).
- The negative side gets 2^(b-1) levels, as the positive one does (the reference clamps it to
  2^(b-1) + 1, which has no code left in b bits).
- A weight of exactly 0 belongs to neither side; it takes the row's level nearest 0 (the reference decodes
  it to 0, which a codebook without a 0 level cannot), and it is left out of the searched error.
"""

from __future__ import annotations

import torch

from dllm_studio.events import CancelToken

ETAS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # for a row of RMS ETA_RMS
ETA_RMS = 0.02
PERCENTILES = (0.98, 0.99, 0.999, 0.9999, 0.99999)
CHUNK_ELEMENTS = 1 << 22  # weights per chunk of rows (~400 MB of temporaries; smaller chunks measured slower)
SEARCH_BYTES = 100  # peak temporaries per weight of a chunk (measured: 416 MB for one chunk of 1024 x 4096)
MIN_STEP = 1e-8  # a side whose range is one value gets a step this small in log2: all its levels are that value


def twin_log(w: torch.Tensor, bits: int, *, cancel: CancelToken | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TLQ of w (out, in): codes uint8 (out, in) in [0, 2^bits) and the codebook fp16 (out, 2^bits); `cancel` is
    checked per chunk of rows and between the stages of its search (a chunk took 2-4 s on one contended thread)."""
    if w.dim() != 2 or not 2 <= bits <= 8:
        raise ValueError(f"twin_log takes a 2-D weight and 2 to 8 bits, not shape {tuple(w.shape)} at {bits} bits")
    w = w.detach().float()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    codebook = torch.empty(w.shape[0], 1 << bits, dtype=torch.float16, device=w.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    cancel = cancel or CancelToken()
    for r0 in range(0, w.shape[0], rows):
        codes[r0:r0 + rows], codebook[r0:r0 + rows] = _rows(w[r0:r0 + rows], 1 << (bits - 1), cancel)
    return codes, codebook


def codebook_dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The weight (out, in) fp32 that codes (out, in) index in their rows' codebook (out, levels)."""
    return torch.gather(codebook.float(), 1, codes.long())


def _round(L: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """TLQ's rounding of log-magnitudes L onto a side's grid: integers in [0, levels)."""
    return torch.clamp(torch.round(L / step) + zero, 0, levels - 1)


class _Side:
    """One sign of a chunk of rows, sorted once: the search prices every (eta, percentile) grid from it.

    Rounding in the log domain is monotone in |w|, so each level takes a contiguous run of the sorted
    magnitudes, bounded where |w| crosses the level midpoints mapped back from log2. With prefix sums of |w|
    and |w|^2, a grid's squared error is a few gathers per level instead of a pass over the weights (4096 x
    4096 at 3 bits: 2-5 s on two CPU threads, against 17-30 s for a pass per grid). A weight within a rounding
    error of a midpoint may be priced at the neighbouring level; only the search sees that, since the codes
    are rounded weight by weight.
    """

    def __init__(self, mask: torch.Tensor, count: torch.Tensor, ordered: torch.Tensor) -> None:
        """`ordered`: the side's `count` magnitudes per row, ascending, then +inf (never summed: sums stop at
        `count`)."""
        self.mask, self.count, self.sorted = mask, count, ordered
        self.sums = torch.empty(2, ordered.shape[0], ordered.shape[1] + 1, dtype=torch.float64, device=ordered.device)
        self.sums[:, :, 0] = 0
        torch.cumsum(ordered, 1, dtype=torch.float64, out=self.sums[0, :, 1:])
        torch.cumsum(ordered.square(), 1, dtype=torch.float64, out=self.sums[1, :, 1:])

    def grids(self, eta: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log2 step and zero point (etas, percentiles, rows) of every candidate grid, for eta (etas, rows)."""
        last = (self.count - 1).clamp_min(0)
        position = torch.tensor(PERCENTILES, device=eta.device)[:, None] * last  # (percentiles, rows)
        lo = position.floor().long()
        pick = lambda i: torch.where(self.count > 0, self.sorted.gather(1, i.T).T, 1.0)  # noqa: E731
        e = eta[:, None]
        # The min is the side's true min; the max torch.quantile's linear interpolation, taken in the log domain.
        low = torch.log2(pick(torch.zeros_like(lo[:1])) + e)
        high = torch.lerp(torch.log2(pick(lo) + e), torch.log2(pick((lo + 1).minimum(last)) + e), position - lo)
        step = ((high - low) / (levels - 1)).clamp_min(MIN_STEP)
        return step, torch.round(-low / step)

    def errors(self, step: torch.Tensor, zero: torch.Tensor, eta: torch.Tensor, levels: int) -> torch.Tensor:
        """Summed squared error (etas, percentiles, rows) of the side's magnitudes on each grid."""
        k = torch.arange(levels, device=step.device, dtype=torch.float64)
        s, z, e = step.double()[..., None], zero.double()[..., None], eta.double()[:, None, :, None]
        value = torch.exp2((k - z) * s) - e
        midpoint = torch.exp2((k[:-1] + 0.5 - z) * s) - e  # |w| at or above it rounds up a level
        rows = self.sorted.shape[0]
        shape = midpoint.shape
        flat = midpoint.permute(2, 0, 1, 3).reshape(rows, -1).to(self.sorted.dtype)
        cut = torch.searchsorted(self.sorted, flat).minimum(self.count[:, None])
        cut = cut.reshape(rows, *shape[:2], levels - 1).permute(1, 2, 0, 3)
        ends = torch.cat((torch.zeros_like(cut[..., :1]), cut, self.count.expand(*shape[:2], -1)[..., None]), -1)
        index = ends.permute(2, 0, 1, 3).reshape(rows, -1)
        s1, s2 = (t.gather(1, index).reshape(rows, *shape[:2], levels + 1).permute(1, 2, 0, 3).diff(dim=-1)
                  for t in self.sums)
        n = ends.diff(dim=-1).double()
        return (s2 - 2 * value * s1 + value.square() * n).sum(-1)


def _rows(w: torch.Tensor, levels: int, cancel: CancelToken) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and codebook of a chunk of rows, `levels` per sign; `cancel` is checked before the sort and each side's
    search."""
    cancel.check()
    a = w.abs()
    etas = torch.tensor(ETAS, device=w.device)[:, None] * (w.square().mean(1).sqrt() / ETA_RMS)  # (etas, rows)
    # One sort of w gives both sides' magnitudes in order: the negatives reversed from its start, the positives
    # from its end.
    ordered = w.sort(1).values
    j = torch.arange(w.shape[1], device=w.device)
    pos, neg = w > 0, w < 0
    npos, nneg = pos.sum(1, keepdim=True), neg.sum(1, keepdim=True)
    positives = torch.where(j < npos, ordered.gather(1, (w.shape[1] - npos + j).clamp(max=w.shape[1] - 1)), torch.inf)
    negatives = torch.where(j < nneg, -ordered.gather(1, (nneg - 1 - j).clamp(min=0)), torch.inf)
    sides = _Side(pos, npos[:, 0], positives), _Side(neg, nneg[:, 0], negatives)
    chosen, total = [], 0
    for side in sides:  # the error splits by sign, so each side keeps its own best percentile
        cancel.check()
        step, zero = side.grids(etas, levels)
        err, best = side.errors(step, zero, etas, levels).min(1)  # over percentiles: (etas, rows)
        chosen.append((step.gather(1, best[:, None])[:, 0], zero.gather(1, best[:, None])[:, 0]))
        total = total + err
    eta_index = total.argmin(0)[None]  # one eta for both sides, as in TLQ
    eta = etas.gather(0, eta_index)[0]
    (sp, zp), (sn, zn) = ((t.gather(0, eta_index)[0] for t in grid) for grid in chosen)
    L = torch.log2(a + eta[:, None])
    q = torch.where(sides[0].mask, _round(L, sp[:, None], zp[:, None], levels),
                    _round(L, sn[:, None], zn[:, None], levels))
    k = torch.arange(levels, device=w.device, dtype=torch.float32)
    magnitudes = [torch.exp2((k - z[:, None]) * s[:, None]) - eta[:, None] for s, z in ((sp, zp), (sn, zn))]
    for side, m in zip(sides, magnitudes):
        m[side.count == 0] = 0  # an empty side holds 0, so that an all-zero row decodes exactly
    codebook = torch.cat((-magnitudes[1].flip(1), magnitudes[0]), dim=1).to(torch.float16)
    codes = torch.where(sides[0].mask, levels + q, levels - 1 - q).to(torch.uint8)
    nearest_zero = codebook[:, levels - 1:levels + 1].float().abs().argmin(1) + levels - 1
    codes = torch.where(w == 0, nearest_zero[:, None].to(torch.uint8), codes)
    return codes, codebook
