"""The continuous-batching engine in-process: rows that join and leave, per-row sampling, the
prefix cache, and failures that stay inside one request."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import kvgen
from kvgen.cache import DynamicLayerCache, LayerShape, RowLayerCache
from kvgen.sampling import SamplingParams, presence_frequency_penalty, sample, sample_rows
from kvgen.server.engine import Engine, EngineRequest, Failed, Started, Token
from kvgen.server.prefix_cache import PrefixCache
from kvgen.testing import build_gemma3, build_llama

PROMPTS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom",
    "Call me",
    "Alice was beginning to get very tired of sitting by her sister on the bank",
    "It is a truth universally acknowledged",
    "the season of Light, it was the season of Darkness",
]


class Collector:
    """Gathers one request's events; `done` is set when it finishes or fails."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list = []
        self.done = threading.Event()
        self.fail_at = fail_at

    def __call__(self, event) -> None:
        self.events.append(event)
        tokens = sum(isinstance(e, Token) for e in self.events)
        if isinstance(event, Token) and self.fail_at is not None and tokens == self.fail_at:
            raise RuntimeError("the consumer broke")
        if isinstance(event, Failed) or (isinstance(event, Token) and event.finish_reason):
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, Token)]


def run_all(engine: Engine, requests: list[tuple[list[int], int, dict]]) -> list[Collector]:
    collectors = []
    for ids, n, kwargs in requests:
        collector = Collector(kwargs.pop("fail_at", None))
        engine.submit(EngineRequest(ids, n, collector, stop_at_eos=False, **kwargs))
        collectors.append(collector)
    for c in collectors:
        assert c.done.wait(60)
    return collectors


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        build_llama(folder)
    else:  # sliding-window layers with a window shorter than the prompts
        build_gemma3(folder, sliding_window=8)
    return kvgen.load(folder, dtype="float32")


def test_rows_joining_and_leaving_equal_solo_runs(lm):
    engine = Engine(lm, max_batch=3, prefix_cache_bytes=0)
    engine.start()
    try:
        requests = [(lm.encode(p), 12 + 5 * i, {}) for i, p in enumerate(PROMPTS)]  # 5 requests, 3 rows
        results = run_all(engine, requests)
        assert engine.metrics.max_batch_size == 3
    finally:
        engine.stop()
    for (ids, n, _), collector in zip(requests, results):
        assert collector.tokens == lm.generate(ids, n, stop_at_eos=False).token_ids
        started = collector.events[0]
        assert isinstance(started, Started) and started.prompt_tokens == len(ids) and started.cached_tokens == 0


def test_quantized_bfloat16_rows_get_their_solo_tokens(lm):
    """The server's continuous batch on int4 weights in bfloat16 (what a fast CPU runs by default):
    each greedy row's tokens are the same request's run alone, whatever else shares its steps."""
    quantized = kvgen.load(lm.path, dtype="bfloat16", quantize="int4")
    assert quantized.runner.quantized == "int4"
    engine = Engine(quantized, max_batch=3, prefix_cache_bytes=0)
    engine.start()
    try:
        requests = [(lm.encode(p), 12, {}) for p in PROMPTS[:3]]
        together = run_all(engine, requests)
    finally:
        engine.stop()
    for (ids, n, _), collector in zip(requests, together):
        assert collector.tokens == quantized.generate(ids, n, stop_at_eos=False).token_ids


def test_prefix_reuse_gives_the_same_tokens(lm):
    engine = Engine(lm, max_batch=2, prefill_chunk=8)
    engine.start()
    try:
        shared = lm.encode(PROMPTS[0] + " " + PROMPTS[2])
        first = run_all(engine, [(shared + lm.encode(" one"), 10, {})])[0]
        second = run_all(engine, [(shared + lm.encode(" two, three"), 10, {})])[0]
    finally:
        engine.stop()
    cached = second.events[0].cached_tokens
    assert cached % 8 == 0 and cached >= len(shared) - 8  # the shared prompt's whole chunks
    for ids, collector in ((shared + lm.encode(" one"), first), (shared + lm.encode(" two, three"), second)):
        assert collector.tokens == lm.generate(ids, 10, stop_at_eos=False).token_ids


def test_a_long_prompt_goes_in_between_decode_steps(lm):
    """A prompt is prefilled a chunk per engine step: a row already decoding keeps getting tokens
    while a long prompt goes in, instead of waiting for all of it; the prompt's answer is unchanged."""
    order: list[str] = []

    class Recorder(Collector):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def __call__(self, event) -> None:
            order.append(f"{self.name} {type(event).__name__}")
            super().__call__(event)

    running, long = Recorder("running"), Recorder("long")
    long_prompt = lm.encode(PROMPTS[0] + " " + PROMPTS[2])
    chunks = -(-len(long_prompt) // 4)
    engine = Engine(lm, max_batch=2, prefix_cache_bytes=0, prefill_chunk=4)
    engine.start()
    try:
        engine.submit(EngineRequest(lm.encode(PROMPTS[1]), 200, running, stop_at_eos=False))
        while not running.tokens:
            time.sleep(0.001)
        order.append("long submitted")
        engine.submit(EngineRequest(long_prompt, 6, long, stop_at_eos=False))
        assert running.done.wait(60) and long.done.wait(60)
    finally:
        engine.stop()
    meanwhile = order[order.index("long submitted") : order.index("long Started")]
    assert chunks >= 8 and meanwhile.count("running Token") >= chunks - 2
    assert long.tokens == lm.generate(long_prompt, 6, stop_at_eos=False).token_ids


def test_the_prompt_cache_never_changes_a_quantized_bfloat16_answer(lm):
    """Prompts continued from the prompt cache, beside others, give the tokens of a fresh prefill
    run alone with the cache off, bit for bit in bfloat16: the cache holds whole chunks only, which a
    fresh prefill computes the same way."""
    quantized = kvgen.load(lm.path, dtype="bfloat16", quantize="int4")
    shared = PROMPTS[0] + " " + PROMPTS[2]
    prompts = [quantized.encode(shared + " " + p) for p in PROMPTS]
    alone = []
    for ids in prompts:
        engine = Engine(quantized, max_batch=1, prefix_cache_bytes=0, prefill_chunk=8)
        engine.start()
        try:
            alone.append(run_all(engine, [(ids, 12, {})])[0].tokens)
        finally:
            engine.stop()
    engine = Engine(quantized, max_batch=4, prefill_chunk=8)
    engine.start()
    try:
        run_all(engine, [(prompts[0], 4, {})])  # leaves the shared chunks in the prompt cache
        together = run_all(engine, [(ids, 12, {}) for ids in prompts])
    finally:
        engine.stop()
    assert all(c.events[0].cached_tokens >= 8 for c in together)
    assert [c.tokens for c in together] == alone


def test_a_failing_request_fails_alone(lm):
    engine = Engine(lm, max_batch=4)
    engine.start()
    try:
        ids = [lm.encode(p) for p in PROMPTS[:3]]
        broken, *fine = run_all(engine, [(ids[0], 20, {"fail_at": 3}), (ids[1], 20, {}), (ids[2], 20, {})])
        assert isinstance(broken.events[-1], Failed) and "the consumer broke" in broken.events[-1].message
        for i, c in zip((1, 2), fine):
            assert c.tokens == lm.generate(ids[i], 20, stop_at_eos=False).token_ids
        after = run_all(engine, [(ids[0], 5, {})])[0]  # still serving
        assert after.tokens == lm.generate(ids[0], 5, stop_at_eos=False).token_ids
        assert engine.running == 0 and engine.metrics.requests["failed"] == 1
    finally:
        engine.stop()


def test_seeded_rows_sample_as_alone(lm):
    engine = Engine(lm, max_batch=4, prefix_cache_bytes=0)
    engine.start()
    try:
        ids = lm.encode(PROMPTS[0])
        params = [SamplingParams(temperature=0.9, top_k=20, seed=s) for s in (1, 2)]
        a, b, greedy = run_all(
            engine, [(ids, 15, {"params": params[0]}), (ids, 15, {"params": params[1]}), (ids, 15, {})]
        )
    finally:
        engine.stop()
    for params_i, c in zip(params, (a, b)):
        expected = lm.generate(ids, 15, temperature=0.9, top_k=20, seed=params_i.seed, stop_at_eos=False).token_ids
        assert c.tokens == expected
    assert a.tokens != b.tokens and greedy.tokens == lm.generate(ids, 15, stop_at_eos=False).token_ids


# The pieces ---------------------------------------------------------------------------------------


def test_row_cache_rows_are_independent():
    shape = LayerShape(kv_heads=2, head_dim=4)
    rows = RowLayerCache(3, shape, torch.float32, torch.device("cpu"), slots=2)  # grows past 2 slots
    singles = [DynamicLayerCache() for _ in range(2)]
    for row, length in ((0, 5), (1, 2)):
        k, v = torch.randn(1, 2, length, 4), torch.randn(1, 2, length, 4)
        singles[row].update(k, v, torch.arange(length)[None])
        rows.put(row, k, v, torch.arange(length)[None])
    k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, values, positions = rows.update(k, v, torch.tensor([[5], [2], [-1]]))  # row 2 idle
    for row in range(2):
        sk, sv, sp = singles[row].update(
            k[row : row + 1], v[row : row + 1], positions[row : row + 1, -1:] * 0 + [5, 2][row]
        )
        held = positions[row] >= 0
        assert torch.equal(keys[row][:, held], sk[0]) and torch.equal(values[row][:, held], sv[0])
        assert positions[row][held].tolist() == sp[0].tolist()
    assert rows.lengths.tolist() == [6, 3, 0] and (positions[2] == -1).all()
    rows.clear(0)
    assert rows.lengths.tolist() == [0, 3, 0] and (rows.positions[0] == -1).all()
    assert [t.shape[2] for t in rows.row(1)[:2]] == [3, 3]


@pytest.mark.parametrize("dtype, heads", [(torch.bfloat16, 4), (torch.bfloat16, 1), (torch.float32, 1)])
def test_each_row_of_a_batch_attends_as_it_would_alone(dtype, heads):
    """Decode attention over rows of different lengths (slots past a row's length empty, position
    -1, as in a batch or a static cache): each row's output is bit for bit the row's own attention
    over its own slots, in a batch of 3 and alone in the padded slots."""
    from kvgen.models.layers import attention, attention_mask

    torch.manual_seed(0)
    lengths, slots, kv_heads, D = [5, 37, 12], 40, 2, 64
    q = torch.randn(3, kv_heads * heads, 1, D).to(dtype)
    k, v = torch.randn(2, 3, kv_heads, slots, D).to(dtype)
    key_positions = torch.full((3, slots), -1)
    for b, n in enumerate(lengths):
        key_positions[b, :n] = torch.arange(n)
    query_positions = torch.tensor(lengths)[:, None]
    together = attention(q, k, v, attention_mask(query_positions, key_positions), 0.125)
    for b, n in enumerate(lengths):
        one = slice(b, b + 1)
        alone = attention(
            q[one], k[one, :, :n], v[one, :, :n], attention_mask(query_positions[one], key_positions[one, :n]), 0.125
        )
        padded = attention(q[one], k[one], v[one], attention_mask(query_positions[one], key_positions[one]), 0.125)
        assert torch.equal(together[b], alone[0]) and torch.equal(padded, alone)


def test_prefix_cache_lookup_and_lru_bound():
    layer = lambda n: [(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4))]  # noqa: E731  (32 bytes a token)
    cache = PrefixCache(max_bytes=32 * 20)
    cache.store([1, 2, 3, 4, 5, 6], layer(6))
    assert cache.lookup([1, 2, 3, 9])[0] == 3
    assert cache.lookup([1, 2, 3, 4, 5, 6])[0] == 5  # one token is always left to prefill
    assert cache.lookup([7, 8])[0] == 0
    cache.store([1, 2, 3, 4, 5, 6, 7, 8], layer(8))  # extends the first: replaces it
    assert len(cache) == 1 and cache.nbytes == 32 * 8
    cache.store([9] * 10, layer(10))
    cache.store([8] * 10, layer(10))  # over 20 tokens' bytes: the least recently used goes
    assert len(cache) == 2 and cache.lookup([1, 2, 3])[0] == 0 and cache.nbytes <= 32 * 20


def test_sample_rows_is_sample_per_row():
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3),
        SamplingParams(temperature=1.2, seed=4),
    ]
    histories = [None, None, None]
    together = sample_rows(logits, params, [p.generator() for p in params], histories)
    alone = [sample(logits[i : i + 1], p, p.generator())[0] for i, p in enumerate(params)]
    assert together.tolist() == [int(t) for t in alone] and together[0] == logits[0].argmax()
    counts = torch.zeros(1, 50)
    counts[0, 7] = 3
    out = presence_frequency_penalty(logits[:1], counts, presence=0.5, frequency=0.25)
    assert out[0, 7] == pytest.approx(logits[0, 7] - 0.5 - 0.75) and torch.equal(out[0, :7], logits[0, :7])
