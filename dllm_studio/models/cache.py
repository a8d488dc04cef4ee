"""Keys and values kept between denoising steps: Fast-dLLM's block-wise approximate KV cache.

A masked-diffusion model attends bidirectionally, so no token's keys are final while any token can still
change. Fast-dLLM (arXiv:2505.22618) observed that they barely move during one block's steps and reuses
those of one full forward for the rest of the block:

- prefix cache: the steps compute the current block and everything after it; the keys and values before
  the block come from the cache;
- dual cache: the steps compute only the current block; the prefix's and the masked suffix's come from it.

This class knows nothing of blocks or of those two modes. A forward given an empty cache runs the whole
sequence and fills it; a forward over a contiguous window of the sequence (its `positions`) attends over
the cached keys and values with the window's own in their place. The sampler decides the windows and when
to refill (`sampling._step_logits`). Keys and values are held as computed: in the activation dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

KV = tuple[torch.Tensor, torch.Tensor]
KVView = Callable[[torch.Tensor, torch.Tensor], KV]  # a layer's (k, v) -> the (k, v) it attends over


class KVCache:
    """Per-layer keys and values (B, n_kv_heads, T, head_dim) of the last full forward."""

    def __init__(self) -> None:
        self._layers: list[KV] = []

    @property
    def empty(self) -> bool:
        return not self._layers

    @property
    def length(self) -> int:
        """Sequence positions held (0 when empty)."""
        return self._layers[0][0].shape[2] if self._layers else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self._layers for t in kv)

    def clear(self) -> None:
        self._layers.clear()

    def truncate(self, length: int) -> None:
        """Keep positions < `length` only: the prefix cache never reads the rest, so it need not hold it."""
        self._layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self._layers]

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, start: int) -> KV:
        """The keys and values layer `layer` attends over, given those its forward computed for positions
        start, start + 1, ...: stored as they are while the cache fills, else in place of the cached ones."""
        if layer == len(self._layers):
            if start:
                raise ValueError("a KV cache is filled by a forward over the whole sequence (positions from 0)")
            self._layers.append((k, v))
            return k, v
        K, V = self._layers[layer]
        stop = start + k.shape[2]
        return (torch.cat((K[:, :, :start], k, K[:, :, stop:]), dim=2),
                torch.cat((V[:, :, :start], v, V[:, :, stop:]), dim=2))


def layer_views(cache: KVCache | None, layers: int, positions: torch.Tensor | None) -> list[KVView | None]:
    """What a model hands each of its `layers` blocks: the cache's `attend` for that layer at the window's first
    position, or None without a cache. A window must be contiguous: it replaces one run of cached positions."""
    if cache is None:
        return [None] * layers
    start = 0
    if positions is not None:
        start = int(positions[0])
        if not torch.equal(positions, torch.arange(start, start + len(positions), device=positions.device)):
            raise ValueError("a forward with a KV cache takes contiguous positions")
    return [functools.partial(cache.attend, i, start=start) for i in range(layers)]
