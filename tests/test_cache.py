"""Caches against each other: a windowed cache must give attention exactly what an unbounded one
gives under the same sliding-window mask, while holding only about `window` tokens."""

import pytest
import torch

from kvgen.cache import (
    SPARE_SLOTS,
    DynamicLayerCache,
    LayerShape,
    RingLayerCache,
    StaticLayerCache,
    make_cache,
    storage_dtype,
    truncate,
)
from kvgen.models.layers import attention, attention_mask

B, H, D = 2, 2, 8
PAD = 3  # row 1 is left-padded by this many slots, as a batched prompt would be


def stream(steps: list[int], seed: int = 0, done: int = 0):
    """(queries, keys, values, positions) per step, from slot `done` on; row 1 starts PAD slots late
    (position -1 before)."""
    generator = torch.Generator().manual_seed(seed)
    for T in steps:
        q, k, v = (torch.randn(B, H, T, D, generator=generator) for _ in range(3))
        slots = torch.arange(done, done + T)
        positions = torch.stack([slots, torch.where(slots >= PAD, slots - PAD, -1)])  # (B, T)
        yield q, k, v, positions
        done += T


def attend(cache, q, k, v, positions, window):
    keys, values, key_positions = cache.update(k, v, positions)
    return attention(q, keys, values, attention_mask(positions, key_positions, window), scale=D**-0.5)


STEPS = {
    "long-prefill-then-decode": [11] + [1] * 12,  # the prompt alone overflows the window
    "short-prefill-then-decode": [2] + [1] * 12,
    "chunks": [3, 1, 5, 1, 1, 7, 2, 1],  # several tokens at a time mid-stream
}


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("window", [1, 4, 9])
@pytest.mark.parametrize("steps", STEPS)
def test_windowed_cache_matches_unbounded(kind, window, steps):
    total = sum(STEPS[steps])
    shape = LayerShape(H, D, window)
    (cache,) = make_cache(kind, [shape], B, total, torch.float32)
    assert isinstance(cache, DynamicLayerCache if kind == "dynamic" else RingLayerCache)
    reference = DynamicLayerCache()  # keeps everything; only the mask applies the window
    slots = min(window, total)
    if kind == "static":
        buffer = cache.keys.data_ptr()
    for q, k, v, positions in stream(STEPS[steps]):
        got = attend(cache, q, k, v, positions, window)
        expected = attend(reference, q, k, v, positions, window)
        real = positions >= 0  # a padding query's output is never read
        torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real], rtol=1e-5, atol=1e-6)
        if kind == "dynamic":  # between steps, only what the next token can see
            assert cache.length <= window - 1
            # its buffers too: a long prompt's slots go once the window has moved past them
            assert cache.keys.untyped_storage().nbytes() <= B * H * (2 * window + SPARE_SLOTS) * D * 4
        else:  # a fixed ring, written in place
            assert cache.keys.shape[2] == slots and cache.keys.data_ptr() == buffer
    assert reference.length == total


def test_make_cache_sizes_each_layer():
    layers = [LayerShape(2, 8, window=4), LayerShape(2, 8), LayerShape(2, 8, window=64)]
    ring, full, short = make_cache("static", layers, 3, 20, torch.float32)
    assert isinstance(full, StaticLayerCache) and full.keys.shape == (3, 2, 20, 8)
    assert isinstance(ring, RingLayerCache) and ring.keys.shape == (3, 2, 4, 8)
    assert short.keys.shape == (3, 2, 20, 8)  # a window longer than the stream: never wraps
    dynamic = make_cache("dynamic", layers, 3, 20, torch.float32)
    assert [c.window for c in dynamic] == [4, None, 64]


def test_a_full_static_cache_refuses_the_next_token():
    """Prefill and decode both refuse a token past the last slot; neither wraps onto slot 0. A
    decode step's write index lives on the device (it reads no Python number, see kvgen.graphs),
    so its refusal is index_copy_'s."""
    (cache,) = make_cache("static", [LayerShape(H, D)], B, 4, torch.float32)
    (q, k, v, positions), *decode = stream([3, 1, 1])
    cache.update(k, v, positions)
    _, k, v, positions = decode[0]
    cache.update(k, v, positions)
    assert cache.index == 4 and cache.written.device == k.device
    with pytest.raises(ValueError, match="static cache is full: 6 tokens do not fit in 4 slots"):
        cache.update(*next(stream([2], done=4))[1:])
    with pytest.raises(IndexError, match="out of bounds"):
        cache.update(*decode[1][1:])
    assert cache.positions[1].tolist() == [-1, -1, -1, 0]  # slot 0 kept row 1's padding


@pytest.mark.parametrize("kind", ["dynamic", "static", "sink"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [1, 2])
def test_cpu_caches_store_what_decode_attends_in_unchanged(kind, dtype, group_size):
    """float16, and bfloat16 without grouped queries, are widened to float32; grouped bfloat16 is kept."""
    stored = torch.bfloat16 if dtype == torch.bfloat16 and group_size > 1 else torch.float32
    layers = [LayerShape(2, 8, rotary=True, group_size=group_size), LayerShape(2, 8, 4, True, group_size)]
    caches = make_cache(kind, layers, 1, 20, dtype)
    for q, k, v, positions in stream([5, 1, 1], seed=1):
        k, v, positions = k[:1].to(dtype), v[:1].to(dtype), positions[:1]
        for cache in caches:
            keys, values, _ = cache.update(k, v, positions)
            assert keys.dtype == values.dtype == stored
            assert torch.equal(keys.to(dtype).to(stored), keys)  # every value still one of `dtype`'s
            for new, held in ((k, keys), (v, values)):  # the newest entry is held as it came
                assert (held == new[:, :, -1:].to(stored)).all(dim=-1).any(dim=-1).all()
    assert storage_dtype(dtype, "cpu", group_size) == stored and storage_dtype(dtype, "meta", group_size) == dtype
    assert storage_dtype(torch.float32, "cpu", group_size) == torch.float32


@pytest.mark.parametrize("T", [1, 3, 130])
def test_grouped_bfloat16_attention_matches_float32(T):
    """Grouped queries in bfloat16 (rows of one head per kv head, `grouped_attention` below 129
    queries) attend as float32 does, each query head to its own kv head under its own query's mask."""
    generator = torch.Generator().manual_seed(0)
    S, kv_heads, group_size = T + 40, 2, 3
    q = torch.randn(2, kv_heads * group_size, T, D, generator=generator)
    k, v = (torch.randn(2, kv_heads, S, D, generator=generator) for _ in range(2))
    positions = torch.arange(S).expand(2, S).clone()
    positions[1, :5] = -1  # row 1 left-padded
    mask = attention_mask(positions[:, -T:], positions, window=16)
    want = attention(q, k, v, mask, D**-0.5)  # float32
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, D**-0.5)
    assert got.dtype == torch.bfloat16
    wrong_heads = attention(q.bfloat16().flip(1), k.bfloat16(), v.bfloat16(), mask, D**-0.5).flip(1)
    assert (got.float() - want).abs().max() < 0.05 < (wrong_heads.float() - want).abs().max()


def test_unwindowed_dynamic_cache_keeps_everything_writing_in_place():
    cache, keys, buffers = DynamicLayerCache(), [], []
    for _, k, v, positions in stream([5] + [1] * 150):
        held, _, _ = cache.update(k, v, positions)
        keys.append(k)
        assert torch.equal(held, torch.cat(keys, dim=2))
        buffers.append(cache.buffers[0].data_ptr())
    assert cache.length == 155 and cache.positions[0].tolist() == list(range(155))
    assert len(set(buffers)) <= 3  # grown twice (5 + 64 slots, then by half), not once per token


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("window", [None, 1, 4, 9])
@pytest.mark.parametrize("keep", [0, 3, 8, 10, 14, 15])
def test_truncate_then_continue(kind, window, keep):
    """A chat's next turn: cut back to the first `keep` tokens, go on as if the rest never came."""
    steps, more = [10, 1, 1, 1, 1, 1], [4, 1, 1]
    caches = make_cache(kind, [LayerShape(H, D, window)], B, sum(steps) + sum(more), torch.float32)
    seen = [step[1:] for step in stream(steps)]
    for k, v, positions in seen:
        caches[0].update(k, v, positions)
    held, length = caches[0].positions[0].tolist(), caches[0].length
    start = 0 if window is None else max(keep - window + 1, 0)
    needed = set(range(start, keep))  # what the next token may see
    if not truncate(caches, keep):
        assert not needed <= set(held), "truncate refused, yet every needed token was still held"
        assert (caches[0].positions[0].tolist(), caches[0].length) == (held, length)  # nothing changed
        return
    reference = DynamicLayerCache()  # as if only the first `keep` tokens had ever come
    reference.update(
        torch.cat([k for k, _, _ in seen], dim=2)[:, :, :keep],
        torch.cat([v for _, v, _ in seen], dim=2)[:, :, :keep],
        torch.cat([p for _, _, p in seen], dim=1)[:, :keep],
    )
    for q, k, v, positions in stream(more, seed=1, done=keep):
        got = attend(caches[0], q, k, v, positions, window)
        expected = attend(reference, q, k, v, positions, window)
        real = positions >= 0
        torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real], rtol=1e-5, atol=1e-6)


def test_truncate_refuses_only_what_a_window_dropped():
    layers = [LayerShape(H, D, window=4)]
    (dynamic,), (ring,) = (make_cache(kind, layers, B, 40, torch.float32) for kind in ("dynamic", "static"))
    for _, k, v, positions in stream([20]):
        dynamic.update(k, v, positions)
        ring.update(k, v, positions)
    assert not dynamic.truncate(19)  # needs tokens 16..18; holds 17..19
    assert not ring.truncate(18)  # needs 15..17; holds 16..19
    assert ring.truncate(19) and ring.positions[0].sort().values.tolist() == [-1, 16, 17, 18]
    assert dynamic.truncate(20) and dynamic.truncate(0) and dynamic.length == 0
    (static,) = make_cache("static", [LayerShape(H, D)], B, 40, torch.float32)
    for _, k, v, positions in stream([20]):
        static.update(k, v, positions)
    assert not static.truncate(21)
    assert static.truncate(5) and static.length == 5 and (static.positions[:, 5:] == -1).all()


def test_a_mask_is_shared_only_while_the_positions_are_equal():
    """Consecutive layers get the same mask object; positions changed in place (a cache writing into
    its buffer) or different ones get a fresh one with the rule applied."""

    def rule(q, k, window):  # the mask rule, written out
        return torch.tensor(
            [[[[(0 <= kp <= qp and (window is None or kp > qp - window)) or qp < 0 for kp in k[0]] for qp in q[0]]]]
        )

    q, k = torch.tensor([[4, 5]]), torch.arange(6)[None].clone()
    first = attention_mask(q, k, 3)
    assert attention_mask(q, k.clone(), 3) is first and torch.equal(first, rule(q.tolist(), k.tolist(), 3))
    k[0, 1] = -1  # written in place
    assert torch.equal(attention_mask(q, k, 3), rule(q.tolist(), k.tolist(), 3))
    assert torch.equal(attention_mask(q, k, None), rule(q.tolist(), k.tolist(), None))
    q[0, 0] = -1
    assert torch.equal(attention_mask(q, k, 3), rule(q.tolist(), k.tolist(), 3))
