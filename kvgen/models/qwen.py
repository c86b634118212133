"""Qwen2 (and Qwen2.5) and Qwen3 in plain PyTorch: Llama's block layout with their own attention.

Qwen2 adds biases to the q, k and v projections (never to o). Qwen3 drops them (unless
`attention_bias`), sets `head_dim` on its own rather than hidden_size / heads, and normalises every
query and key head with an RMSNorm before RoPE. Both may slide a window over some layers.
Parameter names follow transformers' checkpoints, so `remap` only fills in a tied head.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, LayerShape, make_cache
from ..config import Qwen2Config, Qwen3Config
from .layers import RotaryAttention, embedding, project, rope_cos_sin
from .llama import Block, RMSNorm, build_inv_freq
from .llama import remap as remap  # same checkpoint names as Llama: drop stale inv_freq, tie the head


class Attention(RotaryAttention):
    def __init__(self, config: Qwen2Config | Qwen3Config, window: int | None) -> None:
        super().__init__()
        self.head_dim, self.window = config.head_dim, window
        qwen3 = isinstance(config, Qwen3Config)
        qkv_bias, o_bias = (config.attention_bias, config.attention_bias) if qwen3 else (True, False)
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * config.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=o_bias)
        # Qwen3's per-head norms bound the attention logits whatever the projections' scale.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qwen3 else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qwen3 else None
        self.qkv: nn.Module | None = None  # q, k and v in one product, built by the fast path
        self.scale = config.head_dim**-0.5

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = (h.view(B, T, -1, self.head_dim) for h in project(x, self.qkv, self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over D, each head alone; before RoPE, as Qwen3 trained
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H | Hkv, T, D)


class Qwen2(nn.Module):
    """Qwen2 and Qwen2.5 (model_type "qwen2"); `Qwen3` differs only in its config and attention."""

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config | Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config, Attention(config, window)) for window in config.layer_windows),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", build_inv_freq(config.head_dim, config.rope_parameters), persistent=False)

    def cache_layout(self) -> list[LayerShape]:
        """What each layer's KV cache stores per token, and which layers slide a window."""
        c = self.config
        group_size = c.num_attention_heads // c.num_key_value_heads
        return [LayerShape(c.num_key_value_heads, c.head_dim, window, True, group_size) for window in c.layer_windows]

    def forward(
        self, tokens: Tensor, positions: Tensor, cache: list[LayerCache] | None = None, all_logits: bool = False
    ) -> Tensor:
        """(B, T) token ids and positions (-1 = padding) -> logits of the last position, (B, vocab).

        With `all_logits` every position's logits come back, (B, T, vocab). Without a cache the
        call attends only within `tokens`.
        """
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        if cache is None:
            cache = make_cache("dynamic", self.cache_layout(), *tokens.shape, x.dtype)
        rope = rope_cos_sin(positions, self.inv_freq, x.dtype)  # 2 x (B, 1, T, D): every layer uses the same angles
        for block, layer_cache in zip(self.model.layers, cache):
            x = block(x, positions, rope, self.inv_freq, layer_cache)
        if not all_logits:
            x = x[:, -1]  # only the last position picks the next token: no (T, vocab) product
        return self.lm_head(self.model.norm(x))


class Qwen3(Qwen2):
    """Qwen3 dense models (model_type "qwen3"): q/k norms and an explicit head_dim, chosen by its config."""

    config_class = Qwen3Config
