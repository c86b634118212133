"""The generation loop: prefill, decode_one, and the step generator built on them.

The loop knows a model only through its pure forward (`model(tokens, positions, cache)`), its
`cache_layout()` and its context length; it never sees an architecture, and the cache never sees
the loop. Everything above it (text streaming, stop strings, batching results, the CLI) consumes
`generate_tokens`, which yields one (B,) tensor of token ids per step.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import fast, graphs, screen
from .cache import LayerCache, SinkLayerCache, check_sink, make_cache
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
def decode_one(model: nn.Module, token: Tensor, position: Tensor, cache: list[LayerCache]) -> Tensor:
    """Feed one (B,) token per row at its (B,) position; returns the next (B, vocab) logits."""
    return model(token[:, None], position[:, None], cache)


_compiled_forwards: dict[tuple[type, str], Callable] = {}  # (model class, device type) -> its forward, compiled
_unpacked_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # packed weights dropped for one-row steps
_merged_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # packed weights in 2 MB pages for batches
COMPILED_CACHE_SLOTS = 256  # a compiled step's static cache is a multiple of this many slots
# Inductor fuses what produces a product's input into the product's loop, computing it again for
# every row of the weight (a norm 640 times over, in Gemma's step): that loop then computes, where it
# should stream. Storing every computed input instead took Gemma 3 270M's step from ~9 to ~55 tokens/s.
CPU_COMPILE_OPTIONS = {"realize_opcount_threshold": 1}


@torch.inference_mode()
def decode_compiled(model: nn.Module, token: Tensor, position: Tensor, cache: list[LayerCache]) -> Tensor:
    """`decode_one` through `torch.compile`: the step's ~1,800 small ops fused into a few kernels.

    Compiled once per model and cache shape (the first call takes seconds: ~8 s for Gemma 3 270M
    with inductor's cache warm, ~30 s cold). Only caches whose decode step reads no changing Python
    number can be compiled (`graph_safe`): the static kind. Precision casts are emulated, so the
    tokens are the eager step's. The first compiled step of one row drops the model's packed
    weights (`fast.unpack`): the compiler streams the plain rows in its own loops (`fast.linear`),
    ~1.6× faster; a compiled batch keeps them, merged into 2 MB pages (`fast.merge_packed_pages`).
    """
    device = token.device.type
    key = (type(model), device)
    if key not in _compiled_forwards:
        options = {"emulate_precision_casts": True, **(CPU_COMPILE_OPTIONS if device == "cpu" else {})}
        _compiled_forwards[key] = torch.compile(type(model).forward, dynamic=False, options=options)
    if token.numel() == 1 and model not in _unpacked_models:  # a compiled step is for long runs: weights ready now
        fast.unpack(model)
        _unpacked_models.add(model)
    elif model not in _merged_models:
        fast.merge_packed_pages(model)
        _merged_models.add(model)
    return _compiled_forwards[key](model, token[:, None], position[:, None], cache)


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
    cuda_graph: bool = True,
    compile_step: bool = False,
    logits_mask: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[Tensor]:
    """Yield (B,) next-token ids, `max_new_tokens` times: the first from prefill, the rest from decode.

    Rows that finish early keep decoding (their tokens are ignored upstream); closing the generator
    stops the computation before the next step. A `cache` that already holds `start` tokens per row
    is continued (a chat's earlier turns): only `prompts` are prefilled, at positions from `start`.
    `observe` is called with a `Step` after each step's sampling; without it the loop keeps no records.
    `cache_kind="sink"` keeps `sink_tokens` + `window` tokens and runs past the model's context.
    On a GPU with the static cache, decode steps are recorded once as a CUDA graph and replayed
    (`kvgen.graphs`), unless `cuda_graph=False` or `observe` wants each step's tensors.
    `compile_step` runs decode steps through `torch.compile` (`decode_compiled`; static cache only,
    sized up to a multiple of 256 slots so that nearby lengths share one compiled step).
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
    if compile_step and (cache_kind != "static" if cache is None else not graphs.graph_safe(cache)):
        raise ValueError("compile_step needs the static cache: a growing cache would compile again at every step")
    tokens, positions = (t.to(device) for t in left_pad(prompts))
    positions = torch.where(positions >= 0, positions + start, positions)
    slots = tokens.shape[1] + max_new_tokens
    if compile_step:
        slots = -(-slots // COMPILED_CACHE_SLOTS) * COMPILED_CACHE_SLOTS
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

    decode_step = decode_compiled if compile_step else decode_one

    def decode(token: Tensor, position: Tensor) -> Tensor:
        return decode_step(model, token, position, cache)

    if not compile_step and cuda_graph and observe is None and graphs.can_record(cache, device):
        decode = graphs.GraphDecoder(decode, len(prompts), device, graph=graphs.CudaGraph)

    # A plain greedy choice reads only the argmax: a screened head may then skip most logits (kvgen.screen).
    argmax_only = params.greedy and params.repetition_penalty == 1.0 and observe is None and logits_mask is None
    started = time.perf_counter()
    with screen.argmax_only(model, argmax_only):
        logits = prefill(model, tokens, positions, cache)
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
        with screen.argmax_only(model, argmax_only):
            logits = decode(token, position)
        position = position + 1
