"""Gemma 3 (text) in plain PyTorch: sliding-window layers interleaved with global ones.

Each layer is "sliding_attention" (sees the last `sliding_window` tokens, RoPE base 10k) or
"full_attention" (sees everything, RoPE base 1M, maybe scaled), as `layer_types` says. Queries and
keys are RMS-normed per head before RoPE; every block normalises the input and the output of both
its attention and its GeGLU MLP; embeddings are scaled by sqrt(hidden_size) and tied to the head.
Parameter names follow transformers' `Gemma3ForCausalLM` checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import LayerCache, LayerShape, make_cache
from ..config import Gemma3Config
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
    """Gemma's RMSNorm: the weight is stored as an offset from 1, and all of it runs in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.register_buffer("scale", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        scale = 1.0 + self.weight.float() if self.scale is None else self.scale
        # Scaled before the cast back, as transformers does; F.rms_norm is that math in one kernel.
        return F.rms_norm(x.float(), self.weight.shape, scale, self.eps).type_as(x)

    def prepare(self) -> None:
        """Precompute 1 + weight in float32 (the fast path does, at load: a decode step has ~100 norms)."""
        self.scale = 1.0 + self.weight.float()


class Attention(layers.RotaryAttention):
    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qkv: nn.Module | None = None  # q, k and v in one product, built by the fast path
        self.scale = config.query_pre_attn_scalar**-0.5
        self.window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = (
            h.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H | Hkv, T, D)
            for h in project(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        )
        return self.q_norm(q), self.k_norm(k), v


class MLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: nn.Module | None = None  # gate and up in one product, built by the fast path
        self.act = activation(config.hidden_activation)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, self.gate_up, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)


class Block(layers.Block):
    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.width = config.hidden_size
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.self_attn.heads(self.input_layernorm(x))

    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn.o_proj(merge_heads(y)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def forward(
        self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], inv_freq: Tensor, cache: LayerCache
    ) -> Tensor:
        return self.finish(x, self.self_attn(*self.heads(x), positions, rope, inv_freq, cache))


class Gemma3(nn.Module):
    config_class = Gemma3Config

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # A few numbers per layer type, made on the CPU even while the model is built on `meta`; buffers,
        # so that moving the model moves them (a decode step then copies nothing from the host).
        self.rope_freqs = nn.Module()
        with torch.device("cpu"):
            for kind in sorted(set(config.layer_types)):
                freqs = rope_inv_freq(config.head_dim, config.rope_parameters[kind])
                self.rope_freqs.register_buffer(kind, freqs, persistent=False)

    def cache_layout(self) -> list[LayerShape]:
        """What each layer's KV cache stores per token; sliding layers need only their window."""
        c = self.config
        return [
            LayerShape(
                c.num_key_value_heads,
                c.head_dim,
                c.sliding_window if kind == "sliding_attention" else None,
                rotary=True,
                group_size=c.num_attention_heads // c.num_key_value_heads,
            )
            for kind in c.layer_types
        ]

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
        # transformers rounds sqrt(hidden_size) to the weights' dtype first (55.4256 becomes 55.5 in bfloat16).
        x = x * torch.tensor(self.config.hidden_size**0.5).to(x.dtype)
        inv_freq = dict(self.rope_freqs.named_buffers())  # per layer type
        rope = {kind: rope_cos_sin(positions, freqs, x.dtype) for kind, freqs in inv_freq.items()}
        for block, kind, layer_cache in zip(self.model.layers, self.config.layer_types, cache):
            x = block(x, positions, rope[kind], inv_freq[kind], layer_cache)
        if not all_logits:
            x = x[:, -1]  # only the last position picks the next token: no (T, vocab) product
        logits = self.lm_head(self.model.norm(x))
        if (cap := self.config.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def remap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers Gemma 3 state dict -> this module's names.

    Text-only checkpoints (`Gemma3ForCausalLM`) need only the tied head. Multimodal ones
    (`Gemma3ForConditionalGeneration`) keep the text model under `model.language_model.`
    (`language_model.model.` before transformers 5); their vision tower and projector are dropped.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        for prefix in ("model.language_model.", "language_model.model."):
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :]
        name = name.removeprefix("language_model.")  # the old multimodal head: language_model.lm_head
        if name.removeprefix("model.").startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        out[name] = tensor
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied head
    return out
