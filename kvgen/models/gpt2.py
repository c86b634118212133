"""GPT-2 in plain PyTorch: learned absolute positions, pre-LayerNorm blocks, tied LM head.

Parameter names follow transformers' `GPT2LMHeadModel` checkpoints, so a state dict loads after
one `remap` that undoes Conv1D's (in, out) weight layout.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, LayerShape, make_cache
from ..config import GPT2Config
from . import layers
from .layers import activation, attention, attention_mask, embedding, merge_heads


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1  # keeps deep models' attention logits from growing with depth
        self.upcast = config.reorder_and_upcast_attn

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        return tuple(
            self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # 3 x (B, H, T, D)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cache: LayerCache) -> Tensor:
        """This step's queries, keys and values -> attention over the cache, (B, H, T, D)."""
        k, v, key_positions = cache.update(k, v, positions)  # (B, H, S, D), (B, S)
        return attention(q, k, v, attention_mask(positions, key_positions), self.scale, self.upcast)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(layers.Block):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.width = config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.attn.heads(self.ln_1(x))

    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.attn.c_proj(merge_heads(y))
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache) -> Tensor:
        return self.finish(x, self.attn(*self.heads(x), positions, cache))


class GPT2(nn.Module):
    config_class = GPT2Config

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=embedding(config.vocab_size, config.n_embd),
                wpe=embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def cache_layout(self) -> list[LayerShape]:
        """What each layer's KV cache stores per token."""
        return [LayerShape(self.config.n_head, self.config.head_dim)] * self.config.n_layer

    def forward(
        self, tokens: Tensor, positions: Tensor, cache: list[LayerCache] | None = None, all_logits: bool = False
    ) -> Tensor:
        """(B, T) token ids and positions (-1 = padding) -> logits of the last position, (B, vocab).

        With `all_logits` every position's logits come back, (B, T, vocab). Without a cache the
        call attends only within `tokens`.
        """
        x = self.transformer.wte(tokens) + self.transformer.wpe(positions.clamp(min=0))  # (B, T, C)
        if cache is None:
            cache = make_cache("dynamic", self.cache_layout(), *tokens.shape, x.dtype)
        for block, layer_cache in zip(self.transformer.h, cache):
            x = block(x, positions, layer_cache)
        if not all_logits:
            x = x[:, -1]  # only the last position picks the next token: no (T, vocab) product
        return self.lm_head(self.transformer.ln_f(x))


def remap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers GPT-2 state dict -> this module's names and layouts.

    Conv1D stores weights as (in, out); `.t()` gives nn.Linear's (out, in) as a view, so no copy
    is made and `F.linear` reads the original memory in the order it was written.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers that old checkpoints saved
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # the original OpenAI checkpoints have no prefix
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()
        out[name] = tensor
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # tied head
    return out
