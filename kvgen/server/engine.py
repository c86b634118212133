"""The continuous-batching engine: one thread owns the model and runs a step loop.

Requests arrive through `submit` (a bounded queue) and take a free row at a step boundary. Each is
prefilled alone, a chunk of `PREFILL_CHUNK` positions per step, so that the rows decoding meanwhile
never wait for a whole long prompt; it continues the longest cached run of whole chunks of its
prompt (`PrefixCache`), which then keeps the prompt's own whole chunks. Its keys and values are
then copied into its row of a `RowLayerCache`, where every row has its own write index. Each step then decodes one token for every busy row in one forward; each row
samples with its own `SamplingParams` and `torch.Generator`. A row leaves when it finishes or its
client goes away (`EngineRequest.cancel`). Results go out through each request's `emit` callback,
called on the engine thread.

A greedy request gets the same tokens alone, beside others, and with or without the prompt cache:
each row attends alone (kvgen's attention kernel, or `layers.rowwise_attention`), the quantized
weights' kernels compute each row alike whatever the batch, and the prompt cache holds only what a
fresh prefill computes the same way. (Float weights' products in bfloat16 may round a row differently with the batch's size.)

The engine never knows the architecture (only `model(tokens, positions, cache)` and
`cache_layout()`), and an error inside one request fails that request only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..api import LM, _Row
from ..cache import DynamicLayerCache, RowLayerCache
from ..generate import decode_one
from ..grammar import Constraint, mask_logits
from ..sampling import SamplingParams, presence_frequency_penalty, sample_rows
from .prefix_cache import PrefixCache

log = logging.getLogger("kvgen.server")

# Prompts are prefilled in chunks that start at multiples of this many positions, and the prefix
# cache keeps and hands out whole chunks only: a position's keys and values then come out of the
# same products whether its prompt was computed fresh or continued from the cache, so the prompt
# cache never changes an answer (one forward over a whole prompt rounds differently from two).
PREFILL_CHUNK = 256

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Started:
    """A request's prompt is in the batch: how long it is and how much of it came from the prefix cache."""

    prompt_tokens: int
    cached_tokens: int
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None  # per prompt token (first: None)


@dataclass
class Token:
    """One generated token: the text it adds (may be empty), its log-probability, and why the row ended."""

    token_id: int
    text: str
    logprob: float | None = None  # of the chosen token under the model's raw distribution
    top_logprobs: TopLogprobs | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" on the last token


@dataclass
class Failed:
    message: str


Event = Started | Token | Failed


@dataclass
class EngineRequest:
    """One row's worth of work: a tokenized prompt and how to sample its continuation."""

    prompt_ids: list[int]
    max_tokens: int  # 0: the prompt is only prefilled (and scored, with prompt_logprobs), then the request ends
    emit: Callable[[Event], None]  # called on the engine thread
    params: SamplingParams = field(default_factory=SamplingParams)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely ones
    prompt_logprobs: bool = False  # also score the prompt (completions' echo + logprobs); skips the prefix cache
    constraint: Constraint | None = None  # a grammar the row's tokens must follow (kvgen.grammar)
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: the row is freed at the next step boundary."""
        self.cancelled = True


class QueueFull(Exception):
    pass


class Metrics:
    """Counters the engine keeps and /metrics prints (Prometheus text format)."""

    def __init__(self) -> None:
        self.requests = {"finished": 0, "failed": 0, "cancelled": 0}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.batch_rows = 0  # sum over decode steps of the rows decoded together
        self.max_batch_size = 0
        self.batch_size = 0  # the last step's
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s of steps

    def step(self, rows: int, tokens: int) -> None:
        now = time.monotonic()
        self.decode_steps += rows > 0
        self.batch_rows += rows
        self.batch_size = rows
        self.max_batch_size = max(self.max_batch_size, rows)
        self.generated_tokens += tokens
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - 10:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        recent = list(self.recent)
        if not recent:
            return 0.0
        span = max(time.monotonic() - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span if time.monotonic() - recent[-1][0] < 2 else 0.0


class _Active:
    """A request holding a row: its sampling state and what it has generated so far."""

    def __init__(self, lm: LM, request: EngineRequest, row: int, vocab: int, device: torch.device) -> None:
        self.request, self.row = request, row
        self.text = _Row(lm, request.prompt_ids, request.stop, request.stop_at_eos)
        self.generated: list[int] = []
        self.position = len(request.prompt_ids)  # of the next token fed
        self.generator = request.params.generator(device)
        penalised = request.params.repetition_penalty != 1.0
        self.history = torch.tensor([request.prompt_ids], device=device) if penalised else None  # (1, L)
        penalties = request.presence_penalty or request.frequency_penalty
        self.counts = torch.zeros(1, vocab, device=device) if penalties else None  # generated tokens only


class _Prefilling:
    """A request whose prompt goes in a chunk per engine step, into the row it holds meanwhile."""

    def __init__(self, request: EngineRequest, row: int, layers: list[DynamicLayerCache], keep: int) -> None:
        self.request, self.row, self.layers, self.keep = request, row, layers, keep
        self.next = keep  # the next position to compute
        self.logits: list[Tensor] = []  # per chunk: every position's (prompt_logprobs), else the last one's

    @property
    def done(self) -> bool:
        return self.next == len(self.request.prompt_ids)


class Engine:
    """Owns the model; runs requests in a continuously refilled batch of at most `max_batch` rows."""

    def __init__(
        self,
        lm: LM,
        max_batch: int = 8,
        max_queue: int = 256,
        prefix_cache_bytes: int = 256 * 2**20,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if lm.backend != "native":
            raise ValueError("the server needs the native backend")
        self.lm, self.model = lm, lm.model
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.layout = self.model.cache_layout()
        self.cache = [RowLayerCache(max_batch, shape, lm.dtype, lm.device) for shape in self.layout]
        self.rows: list[_Active | None] = [None] * max_batch
        self.prefilling: deque[_Prefilling] = deque()  # oldest first; each holds a row not yet in `rows`
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.waiting: deque[EngineRequest] = deque()
        self.metrics = Metrics()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvgen-engine", daemon=True)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    @property
    def running(self) -> int:
        return sum(a is not None for a in self.rows) + len(self.prefilling)

    @property
    def decoding(self) -> bool:
        return any(a is not None for a in self.rows)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free row. QueueFull past `max_queue`."""
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self._wake.notify()

    # The loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    return
            # Every tensor the engine makes (its row caches included) is an inference tensor, so all
            # of its work, freeing rows too, runs in inference mode (a decode step is faster in it).
            with torch.inference_mode():
                try:
                    self._leave_cancelled()
                    self._admit()
                    self._prefill_chunk()  # one chunk, so that a long prompt never stalls the rows decoding
                    if self.decoding:
                        self._decode_step()
                except Exception:  # a bug in the loop's own bookkeeping: fail who is running, keep serving
                    log.exception("engine step failed")
                    self._fail_all("internal error in the engine step")

    def _leave_cancelled(self) -> None:
        for active in self.rows:
            if active is not None and active.request.cancelled:
                self._release(active, "cancelled")
        for p in [p for p in self.prefilling if p.request.cancelled]:
            self.prefilling.remove(p)
            self.metrics.requests["cancelled"] += 1

    def _admit(self) -> None:
        """Give free rows to waiting requests; their prompts then go in a chunk per step."""
        while (row := self._free_row()) is not None:
            with self._wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                self.metrics.requests["cancelled"] += 1
                continue
            try:
                self.prefilling.append(self._begin(request, row))
            except Exception as e:
                log.exception("prefill failed")
                self._fail(request, row, f"prefill failed: {type(e).__name__}: {e}")

    def _free_row(self) -> int | None:
        held = {p.row for p in self.prefilling}
        return next((row for row, a in enumerate(self.rows) if a is None and row not in held), None)

    def _begin(self, request: EngineRequest, row: int) -> _Prefilling:
        """The request's prompt continued from the prompt cache's longest run of its whole chunks."""
        ids, chunk = request.prompt_ids, self.prefill_chunk
        keep, held = 0, None
        if self.prefix_cache is not None and not request.prompt_logprobs:
            keep, held = self.prefix_cache.lookup(ids)
            keep -= keep % chunk  # whole chunks only: the rest is computed as a fresh prefill would
        # Whole-stream caches for every layer, sliding ones included: the mask does the windowing, and
        # the stream can then go into the prefix cache whole.
        layers = [DynamicLayerCache(None, shape.group_size) for shape in self.layout]
        if keep:
            for cache, (k, v) in zip(layers, held):
                cache.update(k[:, :, :keep], v[:, :, :keep], torch.arange(keep, device=k.device)[None])
        return _Prefilling(request, row, layers, keep)

    def _prefill_chunk(self) -> None:
        """Compute the next chunk of the oldest prompt going in; a finished prompt joins the batch."""
        if not self.prefilling:
            return
        p = self.prefilling[0]
        start, end = p.next, min(p.next + self.prefill_chunk, len(p.request.prompt_ids))
        try:
            p.logits.append(self._forward(p.request.prompt_ids, start, end, p.layers, p.request.prompt_logprobs))
            p.next = end
            if p.done:
                self.prefilling.popleft()
                self._join(p)
        except Exception as e:
            log.exception("prefill failed")
            if p in self.prefilling:
                self.prefilling.remove(p)
            self._fail(p.request, p.row, f"prefill failed: {type(e).__name__}: {e}")

    def _join(self, p: _Prefilling) -> None:
        """A prefilled prompt: its whole chunks into the prompt cache, its stream into its row, and
        its first token sampled."""
        request, ids, layers, keep = p.request, p.request.prompt_ids, p.layers, p.keep
        logits = p.logits[-1][-1:]  # (1, vocab)
        prompt_logprobs = None
        if request.prompt_logprobs:
            prompt_logprobs = [(None, [])] + self._logprobs(torch.cat(p.logits)[:-1], ids[1:], request.logprobs or 0)
        whole = len(ids) - len(ids) % self.prefill_chunk
        if self.prefix_cache is not None and whole > keep:
            self.prefix_cache.store(ids[:whole], [(c.keys[:, :, :whole], c.values[:, :, :whole]) for c in layers])
        self.metrics.prompt_tokens += len(ids)
        self.metrics.cached_tokens += keep
        if request.max_tokens == 0:  # scoring only (echo): the prompt is the whole answer; no row is taken
            self.metrics.requests["finished"] += 1
            request.emit(Started(len(ids), keep, prompt_logprobs))
            return
        for row_cache, cache in zip(self.cache, layers):
            row_cache.put(p.row, cache.keys, cache.values, cache.positions)
        active = _Active(self.lm, request, p.row, logits.shape[-1], self.lm.device)
        self.rows[p.row] = active
        request.emit(Started(len(ids), keep, prompt_logprobs))
        self._advance([active], logits)
        self.metrics.step(0, 1)

    def _forward(self, ids: list[int], start: int, end: int, layers: list, all_logits: bool) -> Tensor:
        """Positions start ... end-1 of a prompt through the model -> their logits (all, or the last)."""
        device = self.lm.device
        tokens = torch.tensor([ids[start:end]], device=device)  # (1, T)
        positions = torch.arange(start, end, device=device)[None]
        logits = self.model(tokens, positions, layers, all_logits=all_logits)
        return logits[0] if all_logits else logits  # (T, vocab) or the last position's (1, vocab)

    def _decode_step(self) -> None:
        """One forward for every busy row; idle rows below the highest busy one ride along at position -1."""
        busy = [a for a in self.rows if a is not None]
        width = max(a.row for a in busy) + 1
        device = self.lm.device
        tokens = torch.zeros(width, dtype=torch.long, device=device)
        positions = torch.full((width,), -1, dtype=torch.long, device=device)
        for a in busy:
            tokens[a.row], positions[a.row] = a.generated[-1], a.position
        try:
            logits = decode_one(self.model, tokens, positions, self.cache)  # (width, vocab)
        except Exception as e:
            log.exception("decode step failed")
            self._fail_all(f"decode failed: {type(e).__name__}: {e}")
            return
        for a in busy:
            a.position += 1
        self._advance(busy, logits[[a.row for a in busy]])
        self.metrics.step(len(busy), len(busy))

    def _advance(self, rows: list[_Active], logits: Tensor) -> None:
        """Sample each row's next token from its (vocab,) logits and hand it to its request."""
        raw = logits
        logits = logits.float().clone()
        for i, a in enumerate(rows):
            r = a.request
            if a.counts is not None:
                logits[i] = presence_frequency_penalty(logits[i], a.counts[0], r.presence_penalty, r.frequency_penalty)
        logits = mask_logits(logits, [a.request.constraint for a in rows])  # each row its own grammar
        try:
            chosen = sample_rows(
                logits, [a.request.params for a in rows], [a.generator for a in rows], [a.history for a in rows]
            ).tolist()
        except Exception:  # settings that sample badly fail alone: sample row by row to find them
            chosen = []
            for i, a in enumerate(rows):
                try:
                    chosen.append(sample_rows(logits[i : i + 1], [a.request.params], [a.generator], [a.history])[0])
                except Exception as e:
                    chosen.append(None)
                    self._fail(a.request, a.row, f"sampling failed: {type(e).__name__}: {e}")
        wanting = [i for i, a in enumerate(rows) if a.request.logprobs is not None]
        logprobs = raw[wanting].float().log_softmax(dim=-1) if wanting else None
        for i, (a, token) in enumerate(zip(rows, chosen)):
            if token is None:
                continue
            try:
                lp = (
                    (None, None) if a.request.logprobs is None else self._top(logprobs[wanting.index(i)], int(token), a)
                )
                self._take(a, int(token), *lp)
            except Exception as e:  # a failing consumer (emit) or decoder fails its own request only
                log.exception("request failed")
                self._fail(a.request, a.row, f"{type(e).__name__}: {e}")

    def _top(self, logprobs: Tensor, token: int, a: _Active) -> tuple[float, TopLogprobs]:
        k = a.request.logprobs
        top = logprobs.topk(k) if k else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return float(logprobs[token]), alternatives

    def _logprobs(self, logits: Tensor, targets: list[int], k: int) -> list[tuple[float, TopLogprobs]]:
        """Each target's log-probability under the (T, vocab) logits before it, with the k most likely."""
        logprobs = logits.float().log_softmax(dim=-1)
        chosen = logprobs.gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        if not k:
            return [(c, []) for c in chosen]
        top = logprobs.topk(k, dim=-1)
        return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]

    def _take(self, a: _Active, token: int, logprob: float | None, top: TopLogprobs | None) -> None:
        a.generated.append(token)
        if a.request.constraint is not None:
            a.request.constraint.advance(token)
        response = a.text.add(token, last_step=len(a.generated) == a.request.max_tokens)
        finish = {"eos": "stop", "stop": "stop", "length": "length"}.get(response.finish_reason)
        if a.history is not None:
            a.history = torch.cat([a.history, a.history.new_tensor([[token]])], dim=1)
        if a.counts is not None:
            a.counts[0, token] += 1
        if finish is not None:  # freed before the client hears of it, so the next request finds the row
            if a.request.constraint is not None:
                a.request.constraint.done = True
            self._release(a, "finished")
        a.request.emit(Token(token, response.text, logprob, top, finish))

    # Leaving the batch --------------------------------------------------------------------------

    def _release(self, a: _Active, outcome: str) -> None:
        self._free(a.row)
        self.metrics.requests[outcome] += 1

    def _free(self, row: int) -> None:
        for cache in self.cache:
            cache.clear(row)
        self.rows[row] = None

    def _fail(self, request: EngineRequest, row: int, message: str) -> None:
        if self.rows[row] is not None and self.rows[row].request is request:
            self._free(row)
        self.metrics.requests["failed"] += 1
        try:
            request.emit(Failed(message))
        except Exception:
            log.exception("could not report a failure")

    def _fail_all(self, message: str) -> None:
        for active in self.rows:
            if active is not None:
                self._fail(active.request, active.row, message)
        while self.prefilling:
            p = self.prefilling.popleft()
            self._fail(p.request, p.row, message)
