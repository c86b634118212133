"""Pieces every model family shares: the layer's three steps, the attention mask rule, attention
itself, activations."""

from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import storage_dtype


class Block(nn.Module, metaclass=abc.ABCMeta):
    """A transformer layer in three steps: `heads` (norm, then the q, k, v projections), attention
    over the cache (the layer's `forward` between them), and `finish` (output projection,
    residuals, MLP). `heads` and `finish` are pure functions of their inputs and the layer's
    tensors: a runner may swap in compiled versions of them (`kvgen.compiled`), while everything
    that touches the cache stays as written."""

    width: int  # the hidden size a layer reads and writes

    @abc.abstractmethod
    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, width) -> queries, keys, values (B, H | Hkv, T, D), before any rotation."""

    @abc.abstractmethod
    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        """The layer's input x and its attention's output y (B, H, T, D) -> the layer's output."""


class RotaryAttention(nn.Module):
    """The attention step of a layer with rotary positions: subclasses make the projections
    (`heads`) and set `window` (None: every earlier token) and `scale`. A runner sets `kernel`
    where this machine has kvgen's attention kernel (`attention`)."""

    window: int | None
    scale: float
    kernel = False

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: Tensor,
        rope: tuple[Tensor, Tensor],
        inv_freq: Tensor,
        cache,
    ) -> Tensor:
        """This step's queries, keys and values -> attention over the cache, (B, H, T, D)."""
        q, k, v, positions, key_positions = rope_and_cache(q, k, v, positions, rope, inv_freq, cache)
        mask = attention_mask(positions, key_positions, self.window)
        return attention(q, k, v, mask, self.scale, kernel=self.kernel)


def merge_heads(y: Tensor) -> Tensor:
    """(B, H, T, D) attention output -> (B, T, H * D), the output projection's input."""
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)


def attention_mask(query_positions: Tensor, key_positions: Tensor, window: int | None = None) -> Tensor:
    """(B, T) query and (B, S) key positions -> (B, 1, T, S) boolean mask, True = may attend.

    A query at position p sees every stored slot at a position 0 <= q <= p, and with a sliding
    `window` only the last `window` of them (p - window < q). Position -1 is an empty slot (left
    padding or a static cache's unwritten tail). Padding queries see every slot so their rows stay
    finite (no all-masked softmax); nothing ever reads their output.
    """
    # Every layer of a forward asks for the same mask (per window): on a CPU the last one built is
    # handed out again while the positions are equal, which is checked, never assumed (on a GPU the
    # check would wait for the device, and building it costs no more; a compiled step fuses it).
    compiling = torch.compiler.is_compiling()
    last = None if compiling else _last_mask.get(window)
    if last is not None and _same(last[0], query_positions) and _same(last[1], key_positions):
        return last[2]
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= k > q - window
    mask = visible | (q < 0)
    if mask.device.type == "cpu" and not compiling:
        _last_mask[window] = (query_positions.clone(), key_positions.clone(), mask)  # clones: caches write in place
    return mask


_last_mask: dict[int | None, tuple[Tensor, Tensor, Tensor]] = {}  # window -> query, key positions, mask


def _same(a: Tensor, b: Tensor) -> bool:
    return b.device.type == "cpu" and a.shape == b.shape and torch.equal(a, b)


# SDPA never returns its attention weights. Tracing sets this to a callable that is handed every
# attention call's (q, k, mask, scale), in layer order, and computes the weights it wants with
# `attention_weights`; None (the default) costs one check per call.
attention_probe: Callable[[Tensor, Tensor, Tensor, float], None] | None = None


def attention_weights(q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q·kᵀ·scale) over the visible slots, (B, H, T, S) in float32: what SDPA computes inside."""
    q, k = q.float(), k.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves several query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


FEW_QUERIES = 128  # on a CPU, steps of at most this many queries attend in `storage_dtype`'s dtype
# On a CPU, a batch row attends over its own visible slots only (`rowwise_attention`); off it (and
# in a recorded CUDA graph, where slice bounds read on the host would be frozen) one call serves all.
CUT_TO_SPANS = True


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, upcast: bool = False, kernel: bool = False
) -> Tensor:
    """Scaled dot-product attention over (B, H, T, D) queries and (B, Hkv, S, D) keys/values.

    `upcast` computes the scores in float32 (GPT-2's `reorder_and_upcast_attn`), which matters
    only for half-precision weights. On a CPU, steps of a few queries (decode, speculative
    verification) attend in the dtype their caches store (`cache.storage_dtype`): float32 where
    SDPA's half-precision kernels are slow (float16; bfloat16 with a kv head per query head), and
    bfloat16 for grouped queries (`grouped_attention`). Long prefills keep the weights' dtype.
    With `kernel`, bfloat16 steps of a few queries take kvgen's attention kernel: every row in
    one call, each computed alone (kernels/attention.cpp); SDPA takes a call a row.
    """
    if attention_probe is not None:
        attention_probe(q, k, mask, scale)
    dtype, group_size = q.dtype, q.shape[1] // k.shape[1]
    few = q.device.type == "cpu" and q.shape[2] <= FEW_QUERIES
    work = torch.float32 if upcast else storage_dtype(dtype, q.device, group_size) if few else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)  # no copy of a cache already stored in `work`
    if kernel and few and work == torch.bfloat16 and q.shape[-1] % 32 == 0:
        return torch.ops.kvgen.attention(q, k, v, mask, scale).to(dtype)
    grouped = few and work == torch.bfloat16 and group_size > 1
    if CUT_TO_SPANS and q.device.type == "cpu" and (few or q.shape[0] == 1):
        return rowwise_attention(q, k, v, mask, scale, grouped).to(dtype)
    return _attend(q, k, v, mask, scale, grouped).to(dtype)  # (B, H, T, D)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, grouped: bool) -> Tensor:
    if grouped:
        return grouped_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def rowwise_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, grouped: bool) -> Tensor:
    """Each batch row attends alone, over the span of slots its queries can see.

    SDPA's sums depend on how many slots a call has, even where the extra ones are masked: in a
    batch, a row would attend over as many slots as the longest row holds, and its numbers would
    change with what else runs beside it (a greedy answer that changes under load); a static
    cache's unwritten tail would likewise make its answers differ from a dynamic cache's. Alone
    and cut to its own visible span, a row computes the same bits whatever the batch and the
    cache. One call per row costs little beside a decode step's weight products (docs/server.md).
    """
    first, end = _spans(mask)
    if len(first) == 1 and first[0] == 0 and end[0] == k.shape[2]:
        return _attend(q, k, v, mask, scale, grouped)  # one row, every slot in its span: nothing to cut
    rows = [
        _attend(q[b : b + 1], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], mask[b : b + 1, :, :, s:e], scale, grouped)
        for b, (s, e) in enumerate(zip(first, end))
    ]
    return torch.cat(rows)


def _spans(mask: Tensor) -> tuple[list[int], list[int]]:
    """Each row's first and last-plus-one visible slot. Every layer of a step is handed the same
    mask object (`attention_mask`), so the last one's spans are kept: reading them back from the
    tensor costs a few small ops and a host sync per layer."""
    if _last_spans and _last_spans[0] is mask:
        return _last_spans[1]
    visible = mask.any(dim=2)[:, 0]  # (B, S): slots some query of the row may see
    first = visible.int().argmax(dim=1).tolist()
    end = (visible.shape[1] - visible.flip(1).int().argmax(dim=1)).tolist()
    _last_spans[:] = [mask, (first, end)]
    return first, end


_last_spans: list = []  # [mask, its spans]: the mask is held, so its id cannot be reused meanwhile


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Grouped-query attention with the query heads of each kv head as the rows of one head.

    The same sums as SDPA's `enable_gqa`, and for one query the same values. SDPA's bfloat16 CPU
    kernel costs much per head and little per query row, so 4 heads of one query cost far more
    than one head of 4 rows: decoding Gemma 3 270M at 500 tokens, 0.11 against 0.19 ms per layer
    in float32 (whose caches take twice the bytes), and 0.5 against 0.9 ms for a batch of 8.
    """
    (B, H, T, D), (Hkv, S) = q.shape, k.shape[1:3]
    rows = q.reshape(B, Hkv, H // Hkv * T, D)  # head h = kv head h // group_size: row (h % group_size, t)
    if T > 1:  # each row sees what its query's position sees
        mask = mask[:, :, None].expand(B, mask.shape[1], H // Hkv, T, S).reshape(B, mask.shape[1], -1, S)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.view(B, H, T, D)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# Names as transformers' ACT2FN spells them; each entry is the same function, not an approximation.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation function {name!r}; kvgen knows: {', '.join(ACTIVATIONS)}") from None


def rope_inv_freq(head_dim: int, rope: dict) -> Tensor:
    """Inverse frequencies (head_dim / 2,) of rotary embeddings, from a transformers-style
    `rope_parameters` dict: {"rope_type": "default" | "linear" | "llama3", "rope_theta": ..., ...}.
    """
    base = rope.get("rope_theta", 10000.0)
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        original = rope["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= original / low) & (wavelen >= original / high)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}; kvgen knows: default, linear, llama3")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(B, T) positions -> cos, sin of shape (B, 1, T, head_dim), computed in float32 like transformers."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.float().to(positions.device)  # (B, T, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys; the two halves of D are the pairs (transformers' layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_and_cache(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], inv_freq: Tensor, cache
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rotate this step's (B, H, T, D) queries and keys and hand the keys and values to the layer's
    cache -> queries, keys, values to attend over, and the query and key positions for the mask.

    Most caches store keys rotated at their text positions (`rope`, the angles of `positions`). A
    cache that `rotates_keys` (the sink cache) stores them un-rotated and moves them: the keys it
    returns are rotated by their places in the cache, and the queries by the places it gave them.
    """
    if not cache.rotates_keys:  # keys are cached rotated, never rotated again
        # queries and keys in one rotation: half the ops for a decode step's few numbers
        q, k = apply_rope(torch.cat([q, k], dim=1), *rope).split([q.shape[1], k.shape[1]], dim=1)
        k, v, key_positions = cache.update(k, v, positions)  # (B, Hkv, S, D), (B, S)
        return q, k, v, positions, key_positions
    k, v, key_positions = cache.update(k, v, positions)  # un-rotated (B, Hkv, S, D), cache places (B, S)
    positions = cache.query_positions  # (B, T)
    q = apply_rope(q, *rope_cos_sin(positions, inv_freq, q.dtype))
    # in the queries' dtype, as every other cache's keys were rotated, whatever the cache stores
    k = apply_rope(k.to(q.dtype), *rope_cos_sin(key_positions, inv_freq, q.dtype))
    return q, k, v, positions, key_positions


def project(x: Tensor, fused: nn.Module | None, *linears: nn.Module) -> tuple[Tensor, ...]:
    """x through several linear maps of it (q, k, v; gate, up): one product over their joined
    weights when the fast path fused them at load (`kvgen.fast`), else one by one."""
    return fused(x) if fused is not None else tuple(linear(x) for linear in linears)


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: its weights always come from the checkpoint, and
    nn.Embedding's random init would import torch._dynamo, a second of start-up."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
