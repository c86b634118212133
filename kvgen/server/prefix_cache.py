"""Prompt-cache reuse: the KV cache of earlier prompts, kept in an LRU bounded by bytes.

A new request looks up the entry sharing the longest prefix with its prompt and prefills only the
rest, as a chat session does between turns (`kvgen.chat`): a chat's earlier turns or a common
system prompt are computed once. The engine stores and reuses whole prefill chunks only
(`engine.PREFILL_CHUNK`), so that reuse never changes an answer. Entries hold every layer's keys and values for positions
0 ... L-1 of one stream; lookups hand out views, and the prefill that continues them concatenates
into new tensors, so an entry is never written after it is stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from torch import Tensor

from ..chat import common_prefix

LayerKV = tuple[Tensor, Tensor]  # (1, H, L, D) keys and values of one layer


class PrefixCache:
    """Token streams -> their per-layer KV, least recently used dropped first past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], list[LayerKV]] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()  # the engine writes; /metrics reads

    def lookup(self, ids: list[int]) -> tuple[int, list[LayerKV] | None]:
        """(tokens reusable, their per-layer KV views) for a prompt; at least one token is left to prefill."""
        with self._lock:
            best, best_len = None, 0
            for key in self.entries:
                n = common_prefix(key, ids)
                if n > best_len:
                    best, best_len = key, n
            keep = min(best_len, len(ids) - 1)
            if best is None or keep < 1:
                return 0, None
            self.entries.move_to_end(best)
            return keep, [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.entries[best]]

    def store(self, ids: list[int], layers: list[LayerKV]) -> None:
        """Keep copies of a stream's KV; entries it extends are dropped, since it serves them too."""
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if not ids or size > self.max_bytes:
            return
        key = tuple(ids)
        with self._lock:
            for old in [old for old in self.entries if key[: len(old)] == old]:
                self._drop(old)
            if any(old[: len(key)] == key for old in self.entries):
                return  # a longer stream that starts with this one is already held
            self.entries[key] = [(k.clone(), v.clone()) for k, v in layers]
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= sum(k.nbytes + v.nbytes for k, v in self.entries.pop(key))

    def __len__(self) -> int:
        return len(self.entries)
