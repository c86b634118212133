"""The sink cache (StreamingLLM): the dynamic cache's results while everything fits, StreamingLLM's
position assignment once it does not, constant memory, and the refusals.

Past the window two references stand in for the definition. For a 1-layer model, a cached key
depends on its token alone, so a fresh transformers forward over [sinks] + [last window] at
positions 0 ... L-1 is exactly what the sink cache must compute. Deeper keys come from hidden
states that saw earlier context, so there the reference is the policy written out slowly:
per-layer Python lists of un-rotated keys and values, with its own RoPE and attention.
"""

import json

import pytest
import torch
from parity import hf_model

import kvgen
from kvgen.cache import LayerShape, SinkLayerCache, make_cache
from kvgen.generate import generate_tokens
from kvgen.testing import build_gemma3, build_llama, build_qwen3

PROMPT = "It was the best of times, it was the worst"
BUILDERS = {"llama": build_llama, "qwen3": build_qwen3, "gemma3": build_gemma3}


def run(lm, ids, n, **kwargs):
    """Greedy (tokens, (n, vocab) logits, per-step cache bytes) from kvgen's loop."""
    steps = []
    tokens = [int(t) for t in generate_tokens(lm.model, [ids], n, observe=steps.append, **kwargs)]
    logits = torch.stack([s.logits[0] for s in steps])
    return tokens, logits, [sum(c.nbytes for c in s.cache) for s in steps]


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A 2-layer Llama with a 64-token context."""
    return kvgen.load(build_llama(tmp_path_factory.mktemp("llama64"), max_position_embeddings=64), dtype="float32")


@pytest.mark.parametrize("arch", BUILDERS)
def test_equals_dynamic_while_it_fits(tmp_path, arch):
    lm = kvgen.load(BUILDERS[arch](tmp_path), dtype="float32")
    ids = lm.encode(PROMPT)
    n = 40 - len(ids)  # prompt + new = 40 tokens, within 4 sinks + 36 (Gemma's 16-token sliding window wraps)
    tokens, logits, _ = run(lm, ids, n)
    for kwargs in (dict(), dict(sink_tokens=4, window=36)):
        sink_tokens, sink_logits, _ = run(lm, ids, n, cache_kind="sink", **kwargs)
        assert sink_tokens == tokens
        # Bit for bit, but Gemma's sliding layers keep a ring (as with the static cache), not a
        # windowed dynamic cache: there only float rounding differs.
        torch.testing.assert_close(sink_logits, logits, rtol=0, atol=1e-5 if arch == "gemma3" else 0)
    assert len(set(tokens)) > 5  # the model does not just repeat itself


@pytest.mark.parametrize("arch", BUILDERS)
def test_one_layer_equals_recompute_over_kept_tokens(tmp_path, arch):
    config = dict(num_hidden_layers=1)
    if arch == "gemma3":
        config["layer_types"] = ["full_attention"]
    folder = BUILDERS[arch](tmp_path, **config)
    lm = kvgen.load(folder, dtype="float32")
    ids, sinks, window, n = lm.encode(PROMPT), 3, 9, 30
    tokens, logits, _ = run(lm, ids, n, cache_kind="sink", sink_tokens=sinks, window=window)
    seq = ids + tokens
    model = hf_model(folder)
    for step in range(n):
        prefix = seq[: len(ids) + step]
        kept = prefix if len(prefix) <= sinks + window else prefix[:sinks] + prefix[-window:]
        with torch.no_grad():
            expected = model(torch.tensor([kept]), position_ids=torch.arange(len(kept))[None]).logits[0, -1]
        torch.testing.assert_close(logits[step], expected, rtol=0, atol=1e-4)


def rotate(x, positions, inv_freq):
    """RoPE, written out: (n, heads, D) vectors turned by (n,) positions, halves of D paired."""
    angles = positions[:, None].float() * inv_freq  # (n, D/2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (n, 1, D/2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@torch.no_grad()
def streaming_llm_logits(model, seq, first, sinks, window):
    """StreamingLLM token by token: next-token logits after each prefix seq[:first], seq[:first+1], ...

    Every layer keeps its un-rotated keys and values in Python lists; each token attends to the
    first `sinks` and the last `window` of them, keys turned to their places 0 ... L-1 and the query
    to L-1.
    """
    cfg, layers = model.config, model.model.layers
    D, heads = cfg.head_dim, cfg.num_attention_heads
    theta = cfg.rope_parameters.get("rope_theta", 10000.0)
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    keys, values = [[] for _ in layers], [[] for _ in layers]
    out = []
    for t, token in enumerate(seq):
        x = model.model.embed_tokens(torch.tensor([token]))  # (1, C)
        for i, block in enumerate(layers):
            attn, h = block.self_attn, block.input_layernorm(x)
            q = attn.q_proj(h).view(heads, D)
            keys[i].append(attn.k_proj(h).view(-1, D))
            values[i].append(attn.v_proj(h).view(-1, D))
            kept = list(range(t + 1)) if t + 1 <= sinks + window else [*range(sinks), *range(t + 1 - window, t + 1)]
            L = len(kept)
            k = rotate(torch.stack([keys[i][j] for j in kept]), torch.arange(L), inv_freq)  # (L, Hkv, D)
            v = torch.stack([values[i][j] for j in kept])  # (L, Hkv, D)
            q = rotate(q[None], torch.tensor([L - 1]), inv_freq)[0]  # (H, D)
            group = heads // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (L, H, D)
            weights = torch.einsum("hd,lhd->hl", q, k).mul(D**-0.5).softmax(dim=-1)
            y = torch.einsum("hl,lhd->hd", weights, v).reshape(1, -1)
            x = x + attn.o_proj(y)
            x = x + block.mlp(block.post_attention_layernorm(x))
        if t + 1 >= first:
            out.append(model.lm_head(model.model.norm(x))[0])
    return torch.stack(out)


@pytest.mark.parametrize("prompt_words", [3, 30])  # the longer prompt overflows sinks + window at prefill
def test_deep_model_equals_streaming_llm_reference(llama64, prompt_words):
    ids = llama64.encode(" ".join(["the season of Light, it was"] * prompt_words)[: prompt_words * 6])
    sinks, window, n = 2, 10, 40
    assert (len(ids) > sinks + window) == (prompt_words == 30)
    tokens, logits, _ = run(llama64, ids, n, cache_kind="sink", sink_tokens=sinks, window=window)
    expected = streaming_llm_logits(llama64.model, ids + tokens[:-1], len(ids), sinks, window)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_constant_memory_far_past_the_context(llama64):
    ids = llama64.encode(PROMPT)
    n = 200  # over three times the 64-token context
    with pytest.raises(ValueError, match="exceeds the model's context"):
        next(generate_tokens(llama64.model, [ids], n))
    tokens, _, nbytes = run(llama64, ids, n, cache_kind="sink")  # 4 sinks + a 60-token window
    assert len(tokens) == n
    layer = 2 * 2 * 16 * 4  # keys and values: 2 kv heads x 16 dims x float32, per token
    assert nbytes == [2 * 64 * layer] * n  # preallocated to sinks + window, never grown
    result = llama64.generate(PROMPT, n, cache="sink", sink_tokens=2, window=20, stop_at_eos=False)
    assert len(result.token_ids) == n and result.finish_reason == "length"


def test_cache_keeps_sinks_and_window_in_place():
    (cache,) = make_cache("sink", [LayerShape(1, 2, rotary=True)], 1, 1000, torch.float32, sink_tokens=2, window=3)
    assert isinstance(cache, SinkLayerCache) and cache.keys.shape == (1, 1, 5, 2)
    buffer = cache.keys.data_ptr()
    token = lambda i: torch.full((1, 1, 1, 2), float(i))  # noqa: E731  # a key that names its stream index
    keys, _, positions = cache.update(torch.cat([token(i) for i in range(4)], dim=2), torch.zeros(1, 1, 4, 2), None)
    assert positions.tolist() == [[0, 1, 2, 3]] and cache.query_positions.tolist() == [[0, 1, 2, 3]]
    for i in range(4, 12):
        keys, _, positions = cache.update(token(i), token(i), None)
        held = {int(p): int(k) for p, k in zip(positions[0], keys[0, 0, :, 0])}  # cache position -> stream index
        assert held == ({0: 0, 1: 1, 2: i - 2, 3: i - 1, 4: i} if i >= 5 else {0: 0, 1: 1, 2: 2, 3: 3, 4: 4})
        assert cache.query_positions.tolist() == [[4]] and cache.keys.data_ptr() == buffer
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), None)
    assert not cache.truncate(5) and cache.truncate(2) and cache.length == 2


def test_refusals(gpt2_tiny, llama64):
    gpt2 = kvgen.load(gpt2_tiny, dtype="float32")
    with pytest.raises(ValueError, match="learned absolute position"):
        gpt2.generate("It was", 5, cache="sink")
    for bad in (dict(sink_tokens=-1), dict(window=0), dict(sink_tokens=2.5), dict(window=61), dict(sink_tokens=65)):
        with pytest.raises(ValueError):
            llama64.generate("It was", 5, cache="sink", **bad)
    with pytest.raises(ValueError, match="prompts of one length"):
        llama64.generate_batch(["It was", "It was the best of"], 5, cache="sink")
    prompts = [llama64.encode(PROMPT)[:5], llama64.encode("Call me Ishmael. Some years ago")[:5]]
    results = llama64.generate_batch(prompts, 5, cache="sink", stop_at_eos=False)
    for prompt, result in zip(prompts, results):  # equal lengths need no padding
        assert result.token_ids == llama64.generate(prompt, 5, stop_at_eos=False).token_ids


def test_cli(cli, tmp_path, gpt2_tiny):
    folder = build_llama(tmp_path, max_position_embeddings=64)
    args = ("generate", "It was", "-m", folder, "--dtype", "float32", "--ignore-eos", "--cache", "sink")
    code, out, _ = cli(*args, "-n", 150, "--sink-tokens", 2, "--window", 30, "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 150
    for bad in (("--window", 0), ("--sink-tokens", -1), ("--window", 70), ("--window", "x")):
        code, _, err = cli(*args, *bad)
        assert code == 2 and "error" in err
    code, _, err = cli("generate", "It was", "-m", gpt2_tiny, "--cache", "sink")
    assert code == 2 and "learned absolute position" in err


def test_chat_session_runs_past_the_context(llama64):
    session = llama64.chat_session(cache="sink", sink_tokens=2, window=30)
    held = 0
    for message in ["hello there", "and again, tell me more"]:
        assert len(list(session.send(message, 40, stop_at_eos=False))) == 40
        held = session.kv_cache[0].index
    assert held > 64 and session.kv_cache[0].length == 32  # the conversation outgrew the context, the cache did not
