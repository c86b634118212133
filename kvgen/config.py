"""Frozen config dataclasses, one per model family, built from a checkpoint's own metadata.

`from_dict` reads a transformers `config.json` (as a dict) and ignores every key the family does
not use, so checkpoints written by newer or older transformers versions load alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _known_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names and v is not None}


@dataclass(frozen=True)
class GPT2Config:
    """Every GPT-2 config field that changes the maths (transformers' names)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GPT2Config":
        config = cls(**_known_fields(cls, raw))
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) is not divisible by n_head ({config.n_head})")
        return config

    @property
    def context_length(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
