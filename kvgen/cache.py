"""KV caches behind one small contract.

Attention hands each layer's cache this step's keys and values, shaped (B, H, T, D), and the
positions of the new tokens, shaped (B, T); the cache answers with everything the queries may
attend to: keys and values (B, H, S, D) and the position of every slot (B, S). Position -1 marks a
slot that holds nothing (left padding, or a static cache's unwritten tail), so one rule builds the
mask for every kind of cache: a query at position p sees the slots at positions 0 <= q <= p
(`kvgen.models.layers.attention_mask`). The model cannot tell the kinds apart, and no cache knows
the loop that drives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CACHE_KINDS = ("dynamic", "static")


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer stores per token: `kv_heads` keys and values of `head_dim`.

    `window` is set for sliding-window layers, which attend to the last `window` tokens only.
    """

    kv_heads: int
    head_dim: int
    window: int | None = None


class DynamicLayerCache:
    """Grows by concatenation as tokens arrive, like transformers' `past_key_values`."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.positions: Tensor | None = None

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, positions
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
            self.positions = torch.cat([self.positions, positions], dim=1)
        return self.keys, self.values, self.positions

    @property
    def length(self) -> int:
        """Tokens stored."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class StaticLayerCache:
    """Preallocated to `max_len` slots and written in place, never reallocated.

    This is how Flax caches keys and values: `lax.dynamic_update_slice` writes the new entries at
    the current index of a fixed-shape buffer. Attention always sees the whole buffer; the slots
    not yet written keep position -1, so the mask hides them.
    """

    def __init__(self, batch: int, shape: LayerShape, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.keys = torch.zeros(batch, shape.kv_heads, max_len, shape.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.index = 0  # next slot to write

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        start, end = self.index, self.index + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"static cache is full: {end} tokens do not fit in {self.keys.shape[2]} slots")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.positions[:, start:end] = positions
        self.index = end
        return self.keys, self.values, self.positions

    @property
    def length(self) -> int:
        return self.index

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


LayerCache = DynamicLayerCache | StaticLayerCache


def make_cache(
    kind: str,
    layers: list[LayerShape],
    batch: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[LayerCache]:
    """One cache per attention layer. `max_len` bounds the static kind (prompt + new tokens)."""
    if kind == "dynamic":
        return [DynamicLayerCache() for _ in layers]
    if kind == "static":
        return [StaticLayerCache(batch, shape, max_len, dtype, torch.device(device)) for shape in layers]
    raise ValueError(f"unknown cache kind {kind!r}; choose one of: {', '.join(CACHE_KINDS)}")
