"""The Python API on a tiny GPT-2: stops, streaming, batching, both backends, errors."""

import json

import pytest
import torch

import kvgen
from kvgen.testing import build_gpt2
from kvgen.text import IncrementalDecoder

PROMPT = "It was the best of times"


@pytest.fixture(scope="module")
def lm(gpt2_tiny):
    return kvgen.load(gpt2_tiny, dtype="float32")


@pytest.fixture(scope="module")
def lm_hf(gpt2_tiny):
    return kvgen.load(gpt2_tiny, dtype="float32", backend="hf")


def test_exactly_max_new_tokens(lm):
    result = lm.generate(PROMPT, 40, stop_at_eos=False)
    assert len(result.token_ids) == 40 and result.finish_reason == "length"
    assert result.prompt_ids == lm.encode(PROMPT)
    assert result.text == lm.tokenizer.decode(result.prompt_ids + result.token_ids)[len(PROMPT) :]
    t = result.timings
    assert t.prompt_tokens == len(result.prompt_ids) and t.new_tokens == 40
    assert t.prefill_s > 0 and t.decode_s > 0 and t.decode_tok_s > 0 and t.load_s > 0


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_eos_ends_generation(lm, lm_hf, backend):
    model = lm if backend == "native" else lm_hf
    free = model.generate(PROMPT, 30, stop_at_eos=False).token_ids
    eos = free[5]
    first = free.index(eos)  # the first time that token appears
    saved, model.eos_token_ids = model.eos_token_ids, [eos]
    try:
        result = model.generate(PROMPT, 30)
        assert result.finish_reason == "eos"
        assert result.token_ids == free[: first + 1]  # EOS included, as transformers returns it
        assert result.text == model.generate(PROMPT, first, stop_at_eos=False).text
        assert model.generate(PROMPT, 30, stop_at_eos=False).token_ids == free
    finally:
        model.eos_token_ids = saved


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_stop_string_is_cut_and_not_returned(lm, lm_hf, backend):
    model = lm if backend == "native" else lm_hf
    full = model.generate(PROMPT, 40, stop_at_eos=False).text
    stop = full[12:15]
    expected = full[: full.index(stop)]
    result = model.generate(PROMPT, 40, stop_at_eos=False, stop=["never appears", stop])
    assert result.finish_reason == "stop" and result.text == expected
    assert "".join(model.stream(PROMPT, 40, stop_at_eos=False, stop=stop)) == expected


def test_stream_joins_to_generate(lm):
    for kwargs in (dict(), dict(temperature=0.9, top_p=0.95, seed=3), dict(cache="static")):
        pieces = list(lm.stream(PROMPT, 48, stop_at_eos=False, **kwargs))
        assert "".join(pieces) == lm.generate(PROMPT, 48, stop_at_eos=False, **kwargs).text
        assert len(pieces) > 1


def test_incremental_decoding_keeps_multibyte_characters_whole(lm):
    text = " naïve café, 東京 and Привет 🙂 done"
    ids = lm.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # characters really are split over several tokens
    decoder = IncrementalDecoder(lm.tokenizer, lm.encode("Call me"))
    pieces = [decoder.add(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_closing_the_stream_stops_computation(lm):
    calls = []
    hook = lm.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        stream = lm.stream(PROMPT, 200, stop_at_eos=False)
        next(stream)
        next(stream)
        stream.close()
        assert len(calls) <= 3  # prefill + at most the steps already consumed
    finally:
        hook.remove()


def test_closing_the_hf_stream_stops_generate(lm_hf):
    calls = []
    hook = lm_hf.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        stream = lm_hf.stream(PROMPT, 200, stop_at_eos=False)
        next(stream)
        stream.close()
        assert len(calls) < 10
    finally:
        hook.remove()


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_batch_rows_equal_single_runs(lm, lm_hf, backend):
    model = lm if backend == "native" else lm_hf
    prompts = [PROMPT, "Call me", "Alice was beginning to get very tired of sitting by her sister"]
    batch = model.generate_batch(prompts, 24, stop_at_eos=False)
    for prompt, result in zip(prompts, batch):
        alone = model.generate(prompt, 24, stop_at_eos=False)
        assert (result.token_ids, result.text) == (alone.token_ids, alone.text)


def test_batch_rows_finish_independently(lm):
    prompts = [PROMPT, "Call me"]
    free = [r.token_ids for r in lm.generate_batch(prompts, 20, stop_at_eos=False)]
    saved, lm.eos_token_ids = lm.eos_token_ids, [free[0][3]]
    try:
        results = lm.generate_batch(prompts, 20)
    finally:
        lm.eos_token_ids = saved
    assert results[0].finish_reason == "eos" and results[0].token_ids == free[0][: free[0].index(free[0][3]) + 1]
    expected = free[1][: free[1].index(free[0][3]) + 1] if free[0][3] in free[1] else free[1]
    assert results[1].token_ids == expected


def test_seed_reproducible_and_backends_agree_on_greedy(lm, lm_hf):
    a = lm.generate(PROMPT, 30, temperature=1.0, top_k=40, seed=11, stop_at_eos=False)
    b = lm.generate(PROMPT, 30, temperature=1.0, top_k=40, seed=11, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert lm.generate(PROMPT, 30).token_ids == lm_hf.generate(PROMPT, 30).token_ids


def test_repetition_penalty_matches_transformers(lm, lm_hf):
    native = lm.generate(PROMPT, 30, repetition_penalty=1.5, stop_at_eos=False)
    assert native.token_ids == lm_hf.generate(PROMPT, 30, repetition_penalty=1.5, stop_at_eos=False).token_ids
    assert native.token_ids != lm.generate(PROMPT, 30, stop_at_eos=False).token_ids


def test_bfloat16_runs(gpt2_tiny):
    lm16 = kvgen.load(gpt2_tiny, dtype="bfloat16")
    assert lm16.dtype == torch.bfloat16
    assert len(lm16.generate(PROMPT, 10, stop_at_eos=False).token_ids) == 10


def test_bad_input(lm, tmp_path):
    with pytest.raises(ValueError, match="prompt is empty"):
        lm.generate("", 5)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        lm.generate(PROMPT, 0)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        lm.generate(PROMPT, 256)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(PROMPT, 5, top_p=0)
    with pytest.raises(ValueError, match="unknown cache kind"):
        lm.generate(PROMPT, 5, cache="paged")
    with pytest.raises(FileNotFoundError, match="model not found"):
        kvgen.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        kvgen.load(tmp_path, dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="cannot load its tokenizer|has no weights"):
        kvgen.load(tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="unknown backend"):
        kvgen.load(tmp_path, backend="onnx")
    with pytest.raises(ValueError, match="unknown dtype"):
        kvgen.load(tmp_path, dtype="int3")


def test_unsupported_model_type(tmp_path):
    folder = build_gpt2(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        kvgen.load(folder, dtype="float32")


def test_hub_id_from_the_local_cache_only(gpt2_tiny, tmp_path, monkeypatch):
    """A hub id loads from the Hugging Face cache when it is there, and is never downloaded."""
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / "0123abcd"
    shutil.copytree(gpt2_tiny, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    lm = kvgen.load("someone/tiny-gpt2", dtype="float32")
    assert lm.path == snapshot
    assert lm.generate(PROMPT, 8).token_ids == kvgen.load(gpt2_tiny, dtype="float32").generate(PROMPT, 8).token_ids
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        kvgen.load("someone/not-downloaded", dtype="float32")
