"""The generation loop: prefill, decode_one, and the step generator built on them.

The loop knows a model only through its pure forward (`model(tokens, positions, cache)`), its
`cache_layout()` and its context length; it never sees an architecture, and the cache never sees
the loop. Everything above it (text streaming, stop strings, batching results, the CLI) consumes
`generate_tokens`, which yields one (B,) tensor of token ids per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .cache import DynamicLayerCache, LayerCache, SinkLayerCache, check_sink, make_cache
from .sampling import SamplingParams, sample


@torch.inference_mode()
def prefill(model: nn.Module, tokens: Tensor, positions: Tensor, cache: list[LayerCache]) -> Tensor:
    """Run the whole (B, T) prompt once, filling the cache; returns the last position's (B, vocab) logits.

    A prompt that overflows a sink cache goes in as one forward over what fits, then one token at a
    time: each later token must see the sinks and the window before it, so the window moves under
    every query, which one forward cannot give.
    """
    room = min((c.room for c in cache if isinstance(c, SinkLayerCache)), default=tokens.shape[1])
    if room >= tokens.shape[1]:
        return model(tokens, positions, cache)
    logits = model(tokens[:, :room], positions[:, :room], cache) if room else None
    for i in range(room, tokens.shape[1]):
        logits = model(tokens[:, i : i + 1], positions[:, i : i + 1], cache)
    return logits


@torch.inference_mode()
def prefill_rows(model: nn.Module, tokens: Tensor, positions: Tensor, cache: list[LayerCache]) -> Tensor:
    """`prefill` for a left-padded (B, T) batch, each row computed alone; returns (B, vocab) logits.

    One forward over the whole batch would multiply every row's prompt in one product, whose
    rounding depends on the other rows (bfloat16 especially): a greedy answer would change with
    its batch. So each row's real tokens go through the model alone, into a cache of their own, and
    the batch cache then takes every row's keys and values, left-padded, in one update per layer:
    the update a batched forward makes, with each row's numbers as its solo run computes them.
    A cache that moves its keys (the sink cache) is prefilled as one batch.
    """
    if tokens.shape[0] == 1 or any(c.rotates_keys for c in cache):
        return prefill(model, tokens, positions, cache)
    width = tokens.shape[1]
    logits, rows = [], []
    for row_tokens, row_positions in zip(tokens, positions):
        real = row_positions >= 0
        own = [DynamicLayerCache(None, shape.group_size) for shape in model.cache_layout()]
        logits.append(model(row_tokens[real][None], row_positions[real][None], own))
        rows.append(own)
    for i, layer in enumerate(cache):
        keys = torch.cat([_left_padded(own[i].keys, width) for own in rows])
        values = torch.cat([_left_padded(own[i].values, width) for own in rows])
        layer.update(keys, values, positions)
    return torch.cat(logits)


def _left_padded(x: Tensor, width: int) -> Tensor:
    """(1, H, L, D) -> (1, H, width, D), zeros in front (slots at position -1, never attended)."""
    return torch.cat([x.new_zeros(*x.shape[:2], width - x.shape[2], x.shape[3]), x], dim=2)


@torch.inference_mode()
def decode_one(model: nn.Module, token: Tensor, position: Tensor, cache: list[LayerCache]) -> Tensor:
    """Feed one (B,) token per row at its (B,) position; returns the next (B, vocab) logits."""
    return model(token[:, None], position[:, None], cache)


Decode = Callable[[Tensor, Tensor], Tensor]  # (B,) tokens, (B,) positions -> (B, vocab) logits
Decoder = Callable[[nn.Module, list[LayerCache], int], Decode]  # (model, cache, batch) -> its decode


def plain_decoder(model: nn.Module, cache: list[LayerCache], batch: int) -> Decode:
    """`decode_one` over one cache: the reference decode, and what a runner builds on (`kvgen.runner`)."""
    return lambda token, position: decode_one(model, token, position, cache)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids of several prompts -> (B, T) tokens and positions, shorter rows padded on the left.

    Each row's positions count from 0 at its first real token, exactly as if it ran alone; pad
    slots get position -1, which the attention mask never attends to.
    """
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        positions[row, width - len(ids) :] = torch.arange(len(ids))
    return tokens, positions


def check_fits(prompt_len: int, max_new_tokens: int, context_length: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > context_length:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {context_length} tokens"
        )


def sink_window(sink_tokens: int, window: int | None, context_length: int, prompts: list[list[int]]) -> int:
    """The sink cache's window (default: the context less the sinks), checked against the context.

    The prompt and new tokens need not fit in the context: the cache keeps sinks + window of them.
    """
    window = context_length - sink_tokens if window is None else window
    check_sink(sink_tokens, window)
    if sink_tokens + window > context_length:
        raise ValueError(
            f"sink_tokens ({sink_tokens}) + window ({window}) exceeds the model's context of {context_length} tokens"
        )
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("the sink cache needs prompts of one length: its sinks would be a padded row's padding")
    return window


@dataclass
class Step:
    """What one step of the loop fed, computed and chose: handed to an observer (tracing) only."""

    index: int  # 0 is the prefill step
    tokens: Tensor  # (B, T) fed this step: the prompt at prefill, one token per row after
    positions: Tensor  # (B, T), -1 for padding
    logits: Tensor  # (B, vocab): the last position's, as computed
    token: Tensor  # (B,) chosen
    cache: list[LayerCache]  # after this step's forward
    seconds: float  # forward + sampling


def generate_tokens(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    cache_kind: str = "dynamic",
    cache: list[LayerCache] | None = None,
    start: int = 0,
    observe: Callable[[Step], None] | None = None,
    sink_tokens: int = 4,
    window: int | None = None,
    decoder: Decoder = plain_decoder,
    logits_mask: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[Tensor]:
    """Yield (B,) next-token ids, `max_new_tokens` times: the first from prefill, the rest from decode.

    Rows that finish early keep decoding (their tokens are ignored upstream); closing the generator
    stops the computation before the next step. A `cache` that already holds `start` tokens per row
    is continued (a chat's earlier turns): only `prompts` are prefilled, at positions from `start`.
    `observe` is called with a `Step` after each step's sampling; without it the loop keeps no records.
    `cache_kind="sink"` keeps `sink_tokens` + `window` tokens and runs past the model's context.
    `decoder` builds the decode step once the cache exists: the model's runner hands in its own
    (`kvgen.runner`: a CUDA graph, say); an observed run takes the plain one, whose tensors it reads.
    `logits_mask` takes each step's (B, vocab) logits and returns them with forbidden tokens at
    -inf, before sampling (a grammar, `kvgen.grammar`); it sees the tokens only as the caller does.
    """
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    if cache_kind == "sink":  # only the sinks and the window are kept, so any length runs
        window = sink_window(sink_tokens, window, model.config.context_length, prompts)
        check_fits(0, max_new_tokens, float("inf"))  # only max_new_tokens >= 1: no context bound
    else:
        check_fits(start + max(map(len, prompts)), max_new_tokens, model.config.context_length)
    tokens, positions = (t.to(device) for t in left_pad(prompts))
    positions = torch.where(positions >= 0, positions + start, positions)
    slots = tokens.shape[1] + max_new_tokens
    fresh = cache is None  # a cache handed in may hold earlier turns: the prompts continue them as one batch
    if cache is None:
        cache = make_cache(
            cache_kind,
            model.cache_layout(),
            len(prompts),
            slots,
            dtype,
            device,
            sink_tokens,
            window,
        )
    generator = params.generator(device)
    # The repetition penalty looks at every token so far; pad slots repeat the row's last prompt token,
    # which the penalty already covers, so padding never changes a row's result.
    history = torch.where(positions >= 0, tokens, tokens[:, -1:]) if params.repetition_penalty != 1.0 else None

    decode = (decoder if observe is None else plain_decoder)(model, cache, len(prompts))
    started = time.perf_counter()
    logits = (prefill_rows if fresh else prefill)(model, tokens, positions, cache)
    position = positions[:, -1] + 1
    for step in range(max_new_tokens):
        if logits_mask is not None:
            logits = logits_mask(logits)
        token = sample(logits, params, generator, history)
        if observe is not None:
            observe(Step(step, tokens, positions, logits, token, cache, time.perf_counter() - started))
            tokens, positions, started = token[:, None], position[:, None], time.perf_counter()
        yield token
        if step + 1 == max_new_tokens:
            return
        if history is not None:
            history = torch.cat([history, token[:, None]], dim=1)
        logits = decode(token, position)
        position = position + 1
