"""Building blocks shared by our LLaDA and Dream ports (both are Llama-style bidirectional encoders).

Numerics follow the reference implementations: RMSNorm statistics in fp32, rotary embeddings
computed in fp32, attention through SDPA with `is_causal=False` (every position sees every other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllm_studio.models.cache import KVView


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (T, head_dim), fp32, in the 'rotate half' (GPT-NeoX) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """Rotate x (B, nh, T, hs). LLaDA rotates in fp32 (`rope_full_precision`); Qwen2/Dream in x's dtype."""
    if full_precision:
        return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None, kv: KVView | None = None
) -> torch.Tensor:
    """Bidirectional attention over (B, nh, T, hs) queries and (B, n_kv, T, hs) keys/values.

    padding_mask: (B, S) with 1/True for real tokens, S the keys' length; padded keys are never attended to.
    kv: this layer's view of a `KVCache` (`KVCache.views`): it swaps the window's keys and values for those
    of the whole sequence, so T queries attend over S >= T keys.
    """
    if kv is not None:
        k, v = kv(k, v)
    mask = None if padding_mask is None else padding_mask.bool()[:, None, None, :]
    enable_gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=enable_gqa)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)


class RopeCache:
    """Rotary tables per (length, device), recomputed only when the sequence grows.

    Kept outside the state dict (as in the reference models) so checkpoints hold weights only.
    Called with a length, the tables of positions 0..length-1; with a (T,) tensor, those of its positions.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def __call__(self, positions: int | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = positions if isinstance(positions, int) else int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < seq_len or self._cos.device != device:
            self._cos, self._sin = rope_tables(seq_len, self.head_dim, self.theta, device)
        if isinstance(positions, int):
            return self._cos[:seq_len], self._sin[:seq_len]
        return self._cos[positions], self._sin[positions]
