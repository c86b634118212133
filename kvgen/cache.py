"""KV caches behind one small contract.

Attention hands each layer's cache this step's keys and values, shaped (B, H, T, D), and the
positions of the new tokens, shaped (B, T); the cache answers with everything the queries may
attend to: keys and values (B, H, S, D) and the position of every slot (B, S). Position -1 marks a
slot that holds nothing (left padding, or a static cache's unwritten tail), so one rule builds the
mask for every kind of cache: a query at position p sees the slots at positions 0 <= q <= p, and in
a sliding-window layer only the last `window` of them, p - window < q
(`kvgen.models.layers.attention_mask`). Slots may come back in any order: the mask reads positions.

A sliding-window layer's cache keeps only what a later query can still see. That relies on how the
loop feeds every cache: each row's positions rise by one per slot, so the last `window - 1` slots
hold everything the next token may attend to. The model cannot tell the kinds apart, and no cache
knows the loop that drives it. `truncate` cuts caches back to a prefix of their stream, so that a
chat can continue from what an earlier turn left.

One kind re-positions what it holds: the sink cache (StreamingLLM) stores keys before RoPE and
hands them back with their places in the cache as positions. Its `rotates_keys` tells attention
to rotate the keys by those positions after `update`, and this step's queries by the cache's
`query_positions`; every other cache stores keys already rotated (`rotates_keys = False`).

Keys and values are stored in the dtype decode steps attend in (`storage_dtype`): on a CPU,
float16 ones and those of bfloat16 layers without grouped queries are widened to float32 (the
same values).

The fixed-shape kinds (static, and its ring for sliding layers) keep their write index in a tensor
on the cache's device and write one-token steps with tensor ops only. Such a step reads no Python
number that changes from step to step, so it can be recorded once as a CUDA graph and replayed
(`kvgen.graphs`); their `graph_safe` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CACHE_KINDS = ("dynamic", "static", "sink")


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer stores per token: `kv_heads` keys and values of `head_dim`.

    `window` is set for sliding-window layers, which attend to the last `window` tokens only.
    `rotary` says the layer positions keys by rotating them (RoPE), so a cache may store them
    un-rotated and move them (the sink cache); learned absolute positions (GPT-2) cannot move.
    `group_size` query heads share each kv head (grouped-query attention; 1: a kv head per query head).
    """

    kv_heads: int
    head_dim: int
    window: int | None = None
    rotary: bool = False
    group_size: int = 1


def storage_dtype(dtype: torch.dtype, device: torch.device | str, group_size: int = 1) -> torch.dtype:
    """The dtype in which a CPU attends over a few queries of `dtype` (`layers.attention`), and so
    the dtype caches store `dtype` keys and values in, for layers of `group_size` queries per kv head.

    SDPA's CPU kernels are slow on one query per head in half precision (bfloat16, 4 heads over 768
    keys: 0.67 ms against 0.09 ms in float32), so such steps attend in float32, and their caches
    hold keys and values widened once as they arrive rather than widened whole at every step. With
    grouped queries, bfloat16 attends in bfloat16, a kv head's query heads as the rows of one head
    (`layers.grouped_attention`): as fast as float32 or faster, over half the bytes. Other devices
    attend in the weights' dtype.
    """
    if torch.device(device).type != "cpu":
        return dtype
    if dtype == torch.float16 or (dtype == torch.bfloat16 and group_size == 1):
        return torch.float32
    return dtype


def empty_slots(
    batch: int, shape: LayerShape, slots: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    """Zeroed (B, Hkv, slots, D) keys and values in the storage dtype, and (B, slots) positions of -1 (empty)."""
    dtype = storage_dtype(dtype, device, shape.group_size)
    keys = torch.zeros(batch, shape.kv_heads, slots, shape.head_dim, dtype=dtype, device=device)
    return keys, torch.zeros_like(keys), torch.full((batch, slots), -1, dtype=torch.long, device=device)


SPARE_SLOTS = 64  # a dynamic cache grows by at least this many slots at a time


class DynamicLayerCache:
    """Holds every entry so far, like transformers' `past_key_values`, in buffers that grow as needed.

    A new entry is written in place after the last one, so a decode step costs the same however
    long the stream; concatenating would copy the whole cache at every step. The buffers grow by
    half when full, which keeps that copy rare. With a `window` it keeps only the last
    `window - 1` entries: the next query sees only those and itself. This step's queries have
    already been handed every entry they need.
    """

    rotates_keys = False  # keys are stored rotated at their text positions

    def __init__(self, window: int | None = None, group_size: int = 1) -> None:
        self.window, self.group_size = window, group_size  # group_size: see LayerShape
        self.buffers: tuple[Tensor, Tensor, Tensor] | None = None  # (B, H, slots, D) keys, values; (B, slots) positions
        self.start = self.end = 0  # slots [start, end) hold the entries
        self.seen = 0  # tokens taken in, dropped ones included

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        T = keys.shape[2]
        self.seen += T
        self._make_room(keys, T)
        k, v, p = self.buffers
        k[:, :, self.end : self.end + T] = keys  # widened here to the storage dtype, if it differs
        v[:, :, self.end : self.end + T] = values
        p[:, self.end : self.end + T] = positions
        self.end += T
        held = self.keys, self.values, self.positions
        if self.window is not None:
            self.start = max(self.start, self.end - (self.window - 1))
            if self.buffers[0].shape[2] > 2 * self.window + SPARE_SLOTS:  # a long prompt's slots: let them go
                self._move(keys, self.window + SPARE_SLOTS)
        return held

    def _make_room(self, keys: Tensor, T: int) -> None:
        """Make sure T more slots follow the entries, in larger buffers if need be (like `keys`)."""
        if self.buffers is None:  # a prompt: room for it and a few tokens more
            self._move(keys, T + SPARE_SLOTS)
        elif self.end + T > self.buffers[0].shape[2]:  # grown by half, so that copies stay rare
            needed = self.length + T
            self._move(keys, needed + max(SPARE_SLOTS, needed // 2))

    def _move(self, like: Tensor, slots: int) -> None:
        """Move the entries to the front of new buffers of `slots` slots."""
        (B, H, _, D), length = like.shape, self.length
        k = like.new_empty(B, H, slots, D, dtype=storage_dtype(like.dtype, like.device, self.group_size))
        v, p = torch.empty_like(k), torch.empty(B, slots, dtype=torch.long, device=like.device)
        if self.buffers is not None:
            k[:, :, :length], v[:, :, :length], p[:, :length] = self.keys, self.values, self.positions
        self.buffers, self.start, self.end = (k, v, p), 0, length

    def keep(self, lo: int, hi: int) -> None:
        """Keep only the held entries lo ... hi - 1 (counted from the oldest held)."""
        self.start, self.end = self.start + lo, self.start + hi

    def truncate(self, keep: int) -> bool:
        """Forget every token after the first `keep`; False, changing nothing, if a token the next
        one would see has already been dropped."""
        first = self.seen - self.length  # the stream index of the oldest token held
        start = 0 if self.window is None else max(keep - (self.window - 1), 0)  # the oldest one needed
        if keep > self.seen or start < min(first, keep):  # [start, keep) needed, [first, seen) held
            return False
        self.keep(max(start - first, 0), max(keep - first, 0))
        self.seen = keep
        return True

    @property
    def keys(self) -> Tensor | None:
        """(B, H, length, D) keys held, oldest first (a view)."""
        return None if self.buffers is None else self.buffers[0][:, :, self.start : self.end]

    @property
    def values(self) -> Tensor | None:
        return None if self.buffers is None else self.buffers[1][:, :, self.start : self.end]

    @property
    def positions(self) -> Tensor | None:
        """(B, length) positions of the entries held."""
        return None if self.buffers is None else self.buffers[2][:, self.start : self.end]

    @property
    def length(self) -> int:
        """Tokens stored."""
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (the buffers may have room for more)."""
        return 0 if self.buffers is None else self.keys.nbytes + self.values.nbytes


class _IndexOnDevice:
    """The write index of a fixed-shape cache, held in a (1,) tensor on the cache's device.

    Writes (`_write`) find their slots from it and advance it with tensor ops alone, so a decode
    step never reads a Python number that a recorded CUDA graph would have frozen. Everything else
    reads it as `index`, a Python int: one device sync, only outside decode steps.
    """

    graph_safe = True  # a one-token update is tensor ops only (see kvgen.graphs)
    keys: Tensor
    values: Tensor
    positions: Tensor
    written: Tensor  # (1,) long: tokens written so far

    @property
    def index(self) -> int:
        return int(self.written)

    @index.setter
    def index(self, value: int) -> None:
        self.written.fill_(value)

    def _slots(self, n: int, skipped: int) -> Tensor:
        """(n,) slots of stream tokens index + skipped ... onwards."""
        return self.written + skipped + torch.arange(n, device=self.written.device)

    def _write(self, keys: Tensor, values: Tensor, positions: Tensor, skipped: int = 0) -> None:
        """Store (B, H, n, D) entries as stream tokens index + skipped ... onwards, then advance."""
        slots = self._slots(keys.shape[2], skipped)
        self.keys.index_copy_(2, slots, keys.to(self.keys.dtype))
        self.values.index_copy_(2, slots, values.to(self.values.dtype))
        self.positions.index_copy_(1, slots, positions)
        self.written.add_(skipped + keys.shape[2])


class StaticLayerCache(_IndexOnDevice):
    """Preallocated to `max_len` slots and written in place, never reallocated.

    This is how Flax caches keys and values: `lax.dynamic_update_slice` writes the new entries at
    the current index of a fixed-shape buffer, an index that is itself an array. Attention always
    sees the whole buffer; the slots not yet written keep position -1, so the mask hides them.
    """

    rotates_keys = False  # keys are stored rotated at their text positions

    def __init__(self, batch: int, shape: LayerShape, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.keys, self.values, self.positions = empty_slots(batch, shape, max_len, dtype, device)
        self.written = torch.zeros(1, dtype=torch.long, device=device)  # the next slot to write

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        T, slots = keys.shape[2], self.keys.shape[2]
        if T == 1:  # reads no Python number (a slot past the end fails in index_copy_)
            self._write(keys, values, positions)
            return self.keys, self.values, self.positions
        start = self.index
        if start + T > slots:
            raise ValueError(f"static cache is full: {start + T} tokens do not fit in {slots} slots")
        self.keys[:, :, start : start + T] = keys
        self.values[:, :, start : start + T] = values
        self.positions[:, start : start + T] = positions
        self.index = start + T
        # Only a decode step needs the fixed shape; a prefill attends over the slots written so far,
        # as the dynamic cache does, not over the empty tail as well.
        return self.keys[:, :, : start + T], self.values[:, :, : start + T], self.positions[:, : start + T]

    def truncate(self, keep: int) -> bool:
        """Forget every token after the first `keep`: their slots go back to position -1."""
        if keep > self.index:
            return False
        self.positions[:, keep:] = -1
        self.index = keep
        return True

    @property
    def length(self) -> int:
        return self.index

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class RingLayerCache(_IndexOnDevice):
    """The static cache of a sliding-window layer: `window` preallocated slots, reused in turn.

    The i-th token of the stream lives in slot i % window, overwriting one that no later query can
    see. Decoding one token writes it in place and attends over the ring, so decode shapes stay
    fixed, as with `StaticLayerCache`. A step of several tokens (prefill) attends over the ring as
    it was plus the new entries, since the first new queries still need slots the last ones would
    overwrite; then the ring keeps the newest `window`, so a prompt may be longer than the window.
    """

    rotates_keys = False  # keys are stored rotated at their text positions

    def __init__(self, batch: int, shape: LayerShape, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        size = min(shape.window, max_len)  # a stream shorter than the window never wraps
        self.keys, self.values, self.positions = empty_slots(batch, shape, size, dtype, device)
        # tokens seen so far; the next one goes to slot index % size
        self.written = torch.zeros(1, dtype=torch.long, device=device)

    def _slots(self, n: int, skipped: int) -> Tensor:
        return super()._slots(n, skipped) % self.keys.shape[2]

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        T, size = keys.shape[2], self.keys.shape[2]
        if T == 1:
            self._write(keys, values, positions)
            return self.keys, self.values, self.positions
        if self.index:
            seen = (
                torch.cat([self.keys, keys], dim=2),
                torch.cat([self.values, values], dim=2),
                torch.cat([self.positions, positions], dim=1),
            )
        else:  # an empty ring adds nothing for the new queries to attend to
            seen = (keys.to(self.keys.dtype), values.to(self.values.dtype), positions)
        kept = min(T, size)
        self._write(keys[:, :, T - kept :], values[:, :, T - kept :], positions[:, T - kept :], skipped=T - kept)
        return seen

    def truncate(self, keep: int) -> bool:
        """Forget every token after the first `keep`; False, changing nothing, if a token the next
        one would see has already been overwritten."""
        size = self.keys.shape[2]  # the window, unless the stream is shorter
        start = max(keep - (size - 1), 0)  # the oldest token needed
        if keep > self.index or start < min(self.index - size, keep):  # [start, keep) needed
            return False
        forgotten = torch.arange(max(keep, self.index - size), self.index, device=self.positions.device) % size
        self.positions[:, forgotten] = -1
        self.index = keep
        return True

    @property
    def length(self) -> int:
        """Tokens stored."""
        return min(self.index, self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class SinkLayerCache:
    """StreamingLLM's cache (Xiao et al., "Efficient Streaming Language Models with Attention
    Sinks"): the first `sinks` tokens of the stream, which soak up attention however long the text
    runs, and the last `window` tokens; everything between is dropped.

    Keys are stored before RoPE. `update` hands back the held keys with their places in the cache,
    0 ... L-1 (sinks first, then the window oldest to newest), as positions, so the usual mask
    applies; attention rotates the keys by those positions and this step's queries by
    `query_positions`, the places the new tokens took. The positions a model sees thus stay below
    sinks + window however long the text. The buffers are preallocated and written in place, the
    window part as a ring, so memory is constant once full.

    Until the cache is full, slot, cache position and stream index coincide, which is exactly what
    a dynamic cache gives a fresh stream. A step of several tokens must fit in the free slots
    (`room`): past that each query would need its own window, so the loop feeds the rest of a long
    prompt one token at a time. Every row is at the same stream position (no left padding).
    """

    rotates_keys = True

    def __init__(
        self,
        batch: int,
        shape: LayerShape,
        sinks: int,
        window: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.sinks, self.window = sinks, window
        size = min(sinks + window, max_len)  # a stream shorter than sinks + window never drops anything
        self.keys, self.values, _ = empty_slots(batch, shape, size, dtype, device)
        self.index = 0  # tokens seen so far
        self.query_positions: Tensor | None = None  # (B, T): where the last update put its tokens

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        (B, _, T, _), size, device = keys.shape, self.keys.shape[2], keys.device
        start = self.index
        if start + T <= size:  # nothing dropped yet: the new tokens take the next slots
            self.keys[:, :, start : start + T] = keys
            self.values[:, :, start : start + T] = values
            self.index = end = start + T
            self.query_positions = torch.arange(start, end, device=device).expand(B, T)
            held = torch.arange(end, device=device).expand(B, end)
            return self.keys[:, :, :end], self.values[:, :, :end], held  # views, no copies
        if T > 1 or size < self.sinks + self.window:
            raise ValueError(f"sink cache: {T} new tokens do not fit in the {size - start} free slots")
        # The stream's i-th token (i >= sinks) lives in slot sinks + (i - sinks) % window: the new one
        # overwrites the oldest of the window.
        slot = self.sinks + (start - self.sinks) % self.window
        self.keys[:, :, slot : slot + 1] = keys
        self.values[:, :, slot : slot + 1] = values
        self.index = start + 1
        self.query_positions = torch.full((B, 1), size - 1, device=device)
        # Window slot j holds the token of rank (j - index) % window among the last `window`.
        ring = torch.arange(self.window, device=device)
        ranks = (ring + self.sinks - self.index) % self.window
        held = torch.cat([torch.arange(self.sinks, device=device), self.sinks + ranks])
        return self.keys, self.values, held.expand(B, size)

    @property
    def room(self) -> int:
        """How many tokens one step may still add at once: the free slots."""
        return self.keys.shape[2] - min(self.index, self.keys.shape[2])

    def truncate(self, keep: int) -> bool:
        """Forget every token after the first `keep`; False, changing nothing, if one of those was dropped."""
        dropped = self.index > self.keys.shape[2]  # tokens sinks ... index - window are gone
        if keep > self.index or (dropped and keep > self.sinks):
            return False
        self.index = keep
        return True

    @property
    def length(self) -> int:
        """Tokens stored."""
        return min(self.index, self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class RowLayerCache:
    """Continuous batching's cache: every batch row has its own write index, so rows join and leave
    independently (`kvgen.server.engine`).

    A step of B tokens per row writes rows 0 ... B-1, each at its own index; a row fed position -1
    (an idle slot) writes nothing that counts and does not advance. A request is prefilled on its
    own and `put` into a free row; `clear` frees it. Sliding-window layers keep whole rows too: the
    mask does the windowing (`attention_mask`), which keeps a row's tokens exactly as a batch-1
    dynamic cache would hand them. Slots grow by doubling, so memory follows the longest row.
    """

    rotates_keys = False  # keys are stored rotated at their text positions

    def __init__(
        self, batch: int, shape: LayerShape, dtype: torch.dtype, device: torch.device, slots: int = 64
    ) -> None:
        self.keys, self.values, self.positions = empty_slots(batch, shape, slots, dtype, device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # next slot to write, per row

    def _reserve(self, slots: int) -> None:
        """Make room for `slots` slots per row (doubling), keeping what is held."""
        have = self.keys.shape[2]
        if slots <= have:
            return
        grow = max(slots, 2 * have) - have
        B, H, _, D = self.keys.shape
        pad = self.keys.new_zeros(B, H, grow, D)
        self.keys, self.values = torch.cat([self.keys, pad], dim=2), torch.cat([self.values, pad], dim=2)
        self.positions = torch.cat([self.positions, self.positions.new_full((B, grow), -1)], dim=1)

    def update(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T = positions.shape
        self._reserve(int(self.lengths[:B].max()) + T)
        rows = torch.arange(B, device=keys.device)[:, None]  # (B, 1)
        slots = self.lengths[:B, None] + torch.arange(T, device=keys.device)  # (B, T)
        self.keys[rows, :, slots] = keys.transpose(1, 2).to(self.keys.dtype)  # indexed view is (B, T, H, D)
        self.values[rows, :, slots] = values.transpose(1, 2).to(self.values.dtype)
        self.positions[rows, slots] = positions
        self.lengths[:B] += (positions >= 0).sum(dim=1)
        used = int(self.lengths[:B].max())
        return self.keys[:B, :, :used], self.values[:B, :, :used], self.positions[:B, :used]  # views

    def put(self, row: int, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Fill `row` with a prefilled stream: (1, H, T, D) keys and values at (1, T) positions."""
        T = keys.shape[2]
        self._reserve(T)
        self.clear(row)
        self.keys[row, :, :T] = keys[0]
        self.values[row, :, :T] = values[0]
        self.positions[row, :T] = positions[0]
        self.lengths[row] = T

    def row(self, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """What `row` holds: (1, H, L, D) keys and values and (1, L) positions (views)."""
        n = int(self.lengths[row])
        return self.keys[row : row + 1, :, :n], self.values[row : row + 1, :, :n], self.positions[row : row + 1, :n]

    def clear(self, row: int) -> None:
        """Free `row`: its slots go back to position -1."""
        self.positions[row] = -1
        self.lengths[row] = 0

    @property
    def length(self) -> int:
        """Slots in use by the longest row."""
        return int(self.lengths.max())

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


LayerCache = DynamicLayerCache | StaticLayerCache | RingLayerCache | SinkLayerCache


def truncate(caches: list[LayerCache], keep: int) -> bool:
    """Cut every layer's cache back to the first `keep` tokens of its stream, to continue from there.

    False when a sliding-window layer has already dropped a token that the next one would see;
    the caches may then be partly cut, and only a fresh cache will do.
    """
    return all([cache.truncate(keep) for cache in caches])


def make_cache(
    kind: str,
    layers: list[LayerShape],
    batch: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    sink_tokens: int = 4,
    window: int | None = None,
) -> list[LayerCache]:
    """One cache per attention layer. `max_len` bounds the static and sink kinds (prompt + new tokens).

    Sliding-window layers get caches that hold about `window` tokens, however long the stream. The
    sink kind keeps `sink_tokens` + `window` tokens in each global layer (`window` defaults to
    `max_len - sink_tokens`) and a ring of its own window in each sliding layer; it needs rotary layers.
    """
    if kind == "dynamic":
        return [DynamicLayerCache(shape.window, shape.group_size) for shape in layers]
    device = torch.device(device)
    if kind == "static":
        return [
            StaticLayerCache(batch, shape, max_len, dtype, device)
            if shape.window is None
            else RingLayerCache(batch, shape, max_len, dtype, device)
            for shape in layers
        ]
    if kind == "sink":
        window = max_len - sink_tokens if window is None else window
        check_sink(sink_tokens, window)
        if not all(shape.rotary for shape in layers):
            raise ValueError(
                "the sink cache re-positions cached keys by rotating them (RoPE); this model has learned "
                "absolute position embeddings (GPT-2), so its cached keys cannot move: use the dynamic or static cache"
            )
        return [
            SinkLayerCache(batch, shape, sink_tokens, window, max_len, dtype, device)
            if shape.window is None
            else RingLayerCache(batch, shape, max_len, dtype, device)
            for shape in layers
        ]
    raise ValueError(f"unknown cache kind {kind!r}; choose one of: {', '.join(CACHE_KINDS)}")


def check_sink(sink_tokens: int, window: int) -> None:
    """ValueError unless `sink_tokens` >= 0 and `window` >= 1 are whole numbers."""
    for name, value, least in (("sink_tokens", sink_tokens, 0), ("window", window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
