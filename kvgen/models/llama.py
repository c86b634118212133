"""Llama in plain PyTorch: RMSNorm pre-norm blocks, rotary positions, grouped-query attention,
SwiGLU MLP.

Parameter names follow transformers' `LlamaForCausalLM` checkpoints (`model.layers.N.self_attn.q_proj`,
...), so a state dict loads as it is; `remap` only fills in a tied head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import LayerCache, LayerShape, make_cache
from ..config import LlamaConfig
from . import layers
from .layers import (
    activation,
    embedding,
    merge_heads,
    project,
    rope_cos_sin,
    rope_inv_freq,
)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 like transformers.

    The normalised activations go back to the input dtype before the scale multiplies them, which
    is transformers' order and matters for half-precision weights.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """Gated MLP (SwiGLU with silu): down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.gate_up: nn.Module | None = None  # gate and up in one product, built by the fast path
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, self.gate_up, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)


def build_inv_freq(head_dim: int, rope: dict) -> Tensor:
    """RoPE inverse frequencies as a float32 tensor on the CPU, even while the model is being built on
    the meta device: they are computed, not stored in the checkpoint, so loading never fills them."""
    with torch.device("cpu"):
        return rope_inv_freq(head_dim, rope)


class Attention(layers.RotaryAttention):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=bias)
        self.qkv: nn.Module | None = None  # q, k and v in one product, built by the fast path
        self.scale, self.window = config.head_dim**-0.5, None

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        return tuple(
            h.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H | Hkv, T, D)
            for h in project(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        )


class Block(layers.Block):
    """A pre-norm block; Qwen's is the same around its own attention (`kvgen.models.qwen`)."""

    def __init__(self, config, attn: nn.Module | None = None, mlp_bias: bool = False) -> None:  # a Llama or Qwen config
        super().__init__()
        self.width = config.hidden_size
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config) if attn is None else attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.self_attn.heads(self.input_layernorm(x))

    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.self_attn.o_proj(merge_heads(y))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(
        self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], inv_freq: Tensor, cache: LayerCache
    ) -> Tensor:
        return self.finish(x, self.self_attn(*self.heads(x), positions, rope, inv_freq, cache))


class Llama(nn.Module):
    """Llama 1/2/3 and the many checkpoints that share its layout (model_type "llama")."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config, mlp_bias=config.mlp_bias) for _ in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", build_inv_freq(config.head_dim, config.rope_parameters), persistent=False)

    def cache_layout(self) -> list[LayerShape]:
        """What each layer's KV cache stores per token."""
        c = self.config
        group_size = c.num_attention_heads // c.num_key_value_heads
        return [LayerShape(c.num_key_value_heads, c.head_dim, rotary=True, group_size=group_size)] * c.num_hidden_layers

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


def remap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers Llama state dict -> this module's names: the same, plus the tied head.

    A tied checkpoint stores the embedding only; the head then shares its tensor (no copy).
    Old checkpoints also saved each layer's RoPE `inv_freq`, which is computed here instead.
    """
    out = {name: t for name, t in state.items() if not name.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
