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


SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' names for the two kinds of layer


def _gemma3_rope(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """RoPE parameters per layer type, from either config format transformers has written.

    transformers 5 saves `rope_parameters` = {"sliding_attention": {...}, "full_attention": {...}};
    older checkpoints (the Hub's Gemma 3 files) give `rope_theta` for global layers,
    `rope_local_base_freq` for sliding ones and `rope_scaling` (global layers only).
    """
    given = raw.get("rope_parameters") or {}
    rope = {kind: dict(given.get(kind) or {"rope_type": "default"}) for kind in (SLIDING, FULL)}
    rope[FULL].update(raw.get("rope_scaling") or {})
    rope[FULL].setdefault("rope_theta", raw.get("rope_theta") or 1_000_000.0)
    rope[SLIDING].setdefault("rope_theta", raw.get("rope_local_base_freq") or 10_000.0)
    return rope


@dataclass(frozen=True)
class Gemma3Config:
    """Every Gemma 3 text config field that changes the maths (transformers' names and defaults).

    `attn_logit_softcapping` is not read: Gemma 3 replaced Gemma 2's attention soft-capping with
    q/k norms, and transformers' Gemma 3 never applies it, whatever the config says.
    """

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention", one per layer
    rope_parameters: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, hash=False)  # per layer type
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Gemma3Config":
        """A `gemma3_text` config, or a multimodal `gemma3` one, whose text model's config is nested."""
        raw = raw.get("text_config") or raw
        if raw.get("use_bidirectional_attention"):
            raise ValueError("bidirectional Gemma 3 (EmbeddingGemma) is an encoder, not a causal language model")
        fields = _known_fields(cls, raw)
        if "layer_types" not in fields:  # older configs give a period: every Nth layer is global
            period = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
            layers = fields.get("num_hidden_layers", cls.num_hidden_layers)
            fields["layer_types"] = [SLIDING if (i + 1) % period else FULL for i in range(layers)]
        fields["layer_types"] = tuple(fields["layer_types"])
        fields["rope_parameters"] = _gemma3_rope(raw)
        config = cls(**fields)
        if len(config.layer_types) != config.num_hidden_layers:
            raise ValueError(
                f"layer_types names {len(config.layer_types)} layers, but num_hidden_layers is {config.num_hidden_layers}"
            )
        if unknown := set(config.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"unsupported layer_types {sorted(unknown)}; kvgen knows: {SLIDING}, {FULL}")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({config.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({config.num_key_value_heads})"
            )
        return config

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


def hf_rope_parameters(raw: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """RoPE settings as transformers 5 standardises them: {"rope_type", "rope_theta", ...}.

    transformers >= 5 saves a `rope_parameters` dict; older config.json files have a top-level
    `rope_theta` and an optional `rope_scaling` dict (which, as in transformers, wins if both exist).
    """
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    rope.setdefault("rope_theta", raw.get("rope_theta") or 10000.0)
    if rope["rope_type"] == "llama3":
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope


def _default_rope() -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": 10000.0}


def _fill_attention_defaults(config: Any) -> None:
    """Fill `num_key_value_heads` and `head_dim` left as None, as transformers does (frozen, hence
    object.__setattr__), and check that query heads group evenly over key/value heads."""
    if config.num_key_value_heads is None:
        object.__setattr__(config, "num_key_value_heads", config.num_attention_heads)
    if config.head_dim is None:
        object.__setattr__(config, "head_dim", config.hidden_size // config.num_attention_heads)
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) is not a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )


def _with_rope(cls: type, raw: dict[str, Any]) -> Any:
    """A Llama-layout config from config.json, its RoPE settings read in either transformers format."""
    fields = _known_fields(cls, raw)
    fields["rope_parameters"] = hf_rope_parameters(
        raw, fields.get("max_position_embeddings", cls.max_position_embeddings)
    )
    return cls(**fields)


@dataclass(frozen=True)
class LlamaConfig:
    """Every Llama config field that changes the maths (transformers' names)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # q, k, v and o projections
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] = dataclasses.field(default_factory=_default_rope, hash=False)

    def __post_init__(self) -> None:
        _fill_attention_defaults(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlamaConfig":
        return _with_rope(cls, raw)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


def _check_layer_types(config: Any) -> None:
    """`layer_types` as a tuple, one known kind per layer."""
    if config.layer_types is None:
        return
    object.__setattr__(config, "layer_types", tuple(config.layer_types))
    if len(config.layer_types) != config.num_hidden_layers:
        raise ValueError(
            f"layer_types names {len(config.layer_types)} layers, but num_hidden_layers is {config.num_hidden_layers}"
        )
    if unknown := set(config.layer_types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"unsupported layer_types {sorted(unknown)}; kvgen knows: sliding_attention, full_attention")


def _qwen_layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), by transformers' rule: `layer_types` if
    given, else the layers from `max_window_layers` on slide, and only when `use_sliding_window`."""
    window = config.sliding_window if config.use_sliding_window else None
    kinds = config.layer_types or [
        "sliding_attention" if window is not None and i >= config.max_window_layers else "full_attention"
        for i in range(config.num_hidden_layers)
    ]
    return [window if kind == "sliding_attention" else None for kind in kinds]


@dataclass(frozen=True)
class Qwen2Config:
    """Every Qwen2 / Qwen2.5 config field that changes the maths (transformers' names)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # not a Qwen2 key, but transformers honours it when present
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] = dataclasses.field(default_factory=_default_rope, hash=False)
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None  # "full_attention" | "sliding_attention" per layer

    def __post_init__(self) -> None:
        _fill_attention_defaults(self)
        _check_layer_types(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen2Config":
        return _with_rope(cls, raw)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def layer_windows(self) -> list[int | None]:
        return _qwen_layer_windows(self)


@dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """Qwen3 dense models: Qwen2's fields, plus q/k norms (always) and an explicit head_dim."""

    head_dim: int = 128  # explicit in Qwen3: not hidden_size // num_attention_heads
    attention_bias: bool = False  # q, k, v and o projections
