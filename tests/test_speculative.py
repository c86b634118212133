"""Prompt-lookup speculative decoding: the same greedy tokens as plain decoding, fewer forwards.

The Gemma 3 model has a sliding window of 6, far shorter than every prompt, so cutting rejected
drafts out of its sliding-window caches (dynamic and ring) is exercised on every rejection.
"""

import contextlib
import itertools
import json

import pytest

import kvgen
from kvgen import speculative
from kvgen.cli import main
from kvgen.speculative import find_draft
from kvgen.testing import build_gemma3, build_llama

REPETITIVE = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"
FREE = "It was the best of times, it was the worst of times, it was the age of wisdom"
N = 32


@pytest.fixture(scope="module")
def models(gpt2_tiny, tmp_path_factory):
    return {
        "gpt2": kvgen.load(str(gpt2_tiny), dtype="float32"),
        "llama": kvgen.load(str(build_llama(tmp_path_factory.mktemp("llama"))), dtype="float32"),
        "gemma3": kvgen.load(
            str(build_gemma3(tmp_path_factory.mktemp("gemma3"), num_key_value_heads=1, sliding_window=6)),
            dtype="float32",
        ),
    }


def echo(lm, text):
    """Token ids of `text` + its greedy continuation, twice, then `text` again: a random model
    rarely copies text, but after this it often repeats its own continuation."""
    ids = lm.encode(text)
    return (ids + lm.generate(ids, 16, stop_at_eos=False).token_ids) * 2 + ids


def both(lm, prompt, n=N, **kwargs):
    plain = lm.generate(prompt, n, **kwargs)
    fast = lm.generate(prompt, n, speculative="prompt_lookup", **kwargs)
    return plain, fast


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_same_tokens_as_plain_greedy(models, family, cache):
    lm = models[family]
    drafted = accepted = 0
    # ngram_size=1 drafts after single-token matches too: random models rarely repeat longer ones.
    for prompt, ngram_size in itertools.product((REPETITIVE, FREE, echo(lm, REPETITIVE), echo(lm, FREE)), (1, 3)):
        plain, fast = both(lm, prompt, cache=cache, stop_at_eos=False, draft_tokens=4, ngram_size=ngram_size)
        assert fast.token_ids == plain.token_ids and fast.text == plain.text
        stats = fast.timings.speculative
        assert stats.verify_steps + stats.accepted == N - 1  # every token after the first
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    if family == "gemma3":  # this random model falls into loops that prompt lookup then copies
        assert accepted > 0 and drafted > accepted
        assert len(lm.encode(FREE)) > 2 * lm.model.config.sliding_window


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_partly_right_drafts(models, family, cache, monkeypatch):
    """Drafts that follow plain greedy decoding's own continuation, with one wrong token in most of
    them: whole drafts, prefixes and nothing get accepted, and 0-3 tokens are cut back each step.
    (Random models rarely repeat themselves, so found drafts alone would seldom be accepted.)"""
    lm = models[family]
    ids = lm.encode(FREE)
    plain = lm.generate(ids, N, cache=cache, stop_at_eos=False)
    future = ids + plain.token_ids

    def oracle(context, n, ngram_size, min_ngram):
        draft = future[len(context) : len(context) + n]
        if draft and (wrong := len(context) % (n + 2)) < len(draft):
            draft[wrong] = (draft[wrong] + 1) % 300
        return draft

    monkeypatch.setattr(speculative, "find_draft", oracle)
    fast = lm.generate(ids, N, cache=cache, stop_at_eos=False, speculative="prompt_lookup", draft_tokens=4)
    stats = fast.timings.speculative
    assert fast.token_ids == plain.token_ids
    assert stats.accepted > N // 3 and stats.drafted - stats.accepted > N // 8


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_always_wrong_drafts_are_cut_from_window_caches(models, cache, monkeypatch):
    """Drafts the model never agrees with: every step cuts 1-4 tokens back, past the window."""
    lm = models["gemma3"]
    plain = lm.generate(FREE, N, cache=cache, stop_at_eos=False)

    def wrong(context, n, ngram_size, min_ngram):
        return [(context[-1] + 1 + i) % 300 for i in range(n)]

    monkeypatch.setattr(speculative, "find_draft", wrong)
    fast = lm.generate(FREE, N, cache=cache, stop_at_eos=False, speculative="prompt_lookup", draft_tokens=4)
    stats = fast.timings.speculative
    assert fast.token_ids == plain.token_ids
    assert stats.drafted - stats.accepted > N  # many rejections, of several tokens at once


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
def test_exactly_max_new_tokens(models, n):
    plain, fast = both(models["gemma3"], REPETITIVE, n, cache="static", stop_at_eos=False, draft_tokens=6)
    assert len(fast.token_ids) == n and fast.token_ids == plain.token_ids and fast.finish_reason == "length"


def test_eos_and_stop_strings_end_it_as_plain(models):
    lm = models["llama"]
    reference = lm.generate(REPETITIVE, N, stop_at_eos=False)
    eos = reference.token_ids[10]
    saved = lm.eos_token_ids
    lm.eos_token_ids = [eos]
    try:
        plain, fast = both(lm, REPETITIVE, ngram_size=1)
    finally:
        lm.eos_token_ids = saved
    assert fast.finish_reason == plain.finish_reason == "eos"
    assert fast.token_ids == plain.token_ids == reference.token_ids[: reference.token_ids.index(eos) + 1]

    stop = reference.text[len(reference.text) // 2 :][:3]
    plain, fast = both(lm, REPETITIVE, stop=stop, stop_at_eos=False, ngram_size=1)
    assert fast.finish_reason == plain.finish_reason == "stop"
    assert fast.text == plain.text and fast.token_ids == plain.token_ids


def test_stream_and_close(models):
    lm = models["gpt2"]
    kwargs = {"stop_at_eos": False, "speculative": "prompt_lookup", "draft_tokens": 3, "ngram_size": 1}
    pieces = list(lm.stream(REPETITIVE, N, **kwargs))
    assert "".join(pieces) == lm.generate(REPETITIVE, N, stop_at_eos=False).text
    with contextlib.closing(lm.stream_responses(REPETITIVE, N, **kwargs)) as responses:
        first = [next(responses) for _ in range(3)]
    assert [r.finish_reason for r in first] == [None] * 3
    with pytest.raises(StopIteration):
        next(responses)


def test_find_draft_takes_latest_longest_match():
    context = [1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 2, 3]
    assert find_draft(context, 2, ngram_size=2) == [7, 8]  # the latest "2 3", not the first
    assert find_draft([7, 1, 2, 5, 6, 3, 1, 2], 3, ngram_size=3) == [5, 6, 3]  # falls back to a 2-gram
    assert find_draft([4, 1, 2, 5, 6, 3, 2], 3, ngram_size=3) == []  # a 1-gram is not enough by default
    assert find_draft([4, 1, 2, 5, 6, 3, 2], 3, ngram_size=3, min_ngram=1) == [5, 6, 3]
    assert find_draft([1, 2, 3], 4) == []
    assert find_draft([5, 5], 4, ngram_size=1, min_ngram=1) == [5]


def test_refusals(models, gpt2_tiny):
    lm = models["gpt2"]
    cases = [
        ({"temperature": 0.7}, "greedy only"),
        ({"repetition_penalty": 1.2}, "greedy only"),
        ({"draft_tokens": 0}, "at least 1"),
        ({"trace": True}, "traced"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lm.generate(FREE, 4, speculative="prompt_lookup", **kwargs)
    with pytest.raises(ValueError, match="unknown speculative method"):
        lm.generate(FREE, 4, speculative="medusa")
    with pytest.raises(ValueError, match="one prompt at a time"):
        lm.generate_batch([FREE, REPETITIVE], 4, speculative="prompt_lookup")
    with pytest.raises(ValueError, match="native backend"):
        kvgen.load(str(gpt2_tiny), backend="hf").generate(FREE, 4, speculative="prompt_lookup")


def test_cli(capsys, gpt2_tiny):
    args = ["generate", REPETITIVE, "-m", str(gpt2_tiny), "-n", "12", "--ignore-eos", "--json", "--dtype", "float32"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative", "prompt_lookup", "--draft-tokens", "3"]) == 0

    fast = json.loads(capsys.readouterr().out)
    assert fast["token_ids"] == json.loads(plain)["token_ids"]
    assert fast["timings"]["speculative"]["verify_steps"] + fast["timings"]["speculative"]["accepted"] == 11
    assert main(args + ["--speculative", "prompt_lookup", "--temperature", "0.5"]) == 2
    assert "greedy only" in capsys.readouterr().err
