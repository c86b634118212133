"""`kvgen serve` as users meet it: a real server process on a loopback port, a tiny random GPT-2,
and the official `openai` client (plus raw HTTP where the client would hide the response)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

import kvgen
from kvgen.server import GRACE_SECONDS

PROMPT = "It was the best of times"
PROMPTS = [
    "It was the best of times",
    "Call me Ishmael",
    "Alice was beginning to get very tired",
    "It is a truth universally acknowledged",
    "the season of Light",
    "watery part of the world",
    "a single man in possession of a good fortune",
    "conversations in it",
]
NO_EOS = {"ignore_eos": True}  # vLLM's extra field: exact lengths from a random model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path | str, *args: str, log: Path, threads: int = 1) -> Iterator[str]:
    """`kvgen serve -m MODEL --dtype float32 ARGS` for the length of the block; yields its base URL."""
    with server_process(model, *args, log=log, threads=threads) as (_, url):
        yield url


@contextmanager
def server_process(
    model: Path | str, *args: str, log: Path, threads: int = 1
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`kvgen serve`, as `running_server`: yields the process too."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A shared 2-core machine: tiny models gain nothing from a second thread; one thread also repeats exactly.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("KVGEN_API_KEY", None)
    with open(log, "w") as out:
        command = [sys.executable, "-m", "kvgen", "serve", "-m", str(model), "--dtype", "float32", "--port", str(port)]
        process = subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180  # a real model may be converted first
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"kvgen serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvgen serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def url(gpt2_tiny, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # Chunks of 8 positions, so that the tiny prompts here fill whole chunks of the prompt cache
    with running_server(gpt2_tiny, "--max-batch", "6", "--prefill-chunk", "8", log=log) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(gpt2_tiny) -> str:
    return str(gpt2_tiny)


@pytest.fixture(scope="module")
def lm(gpt2_tiny):
    import torch

    torch.set_num_threads(1)
    return kvgen.load(gpt2_tiny, dtype="float32")


def complete(client, model, prompt=PROMPT, n_tokens=24, extra_body=None, **kwargs):
    """A greedy completion of exactly `n_tokens` tokens."""
    extra_body = {**NO_EOS, **(extra_body or {})}
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=n_tokens, temperature=0, extra_body=extra_body, **kwargs
    )


# Completions and chat ---------------------------------------------------------------------------


def test_greedy_completion_equals_the_library(client, model, lm):
    reply = complete(client, model, n_tokens=30)
    expected = lm.generate(PROMPT, 30, stop_at_eos=False)
    choice = reply.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert reply.model == model and reply.id.startswith("cmpl-") and reply.created > 0
    assert reply.usage.prompt_tokens == len(expected.prompt_ids) and reply.usage.completion_tokens == 30
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 30


def test_streamed_text_equals_non_streamed(client, model):
    whole = complete(client, model, n_tokens=40).choices[0].text
    chunks = list(complete(client, model, n_tokens=40, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole and len(pieces) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_stream_equals_non_stream(client, model, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call me Ishmael"}]
    kwargs = dict(model=model, messages=messages, max_completion_tokens=25, temperature=0, extra_body=NO_EOS)
    reply = client.chat.completions.create(**kwargs)
    message = reply.choices[0].message
    assert message.role == "assistant" and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    expected = lm.chat(messages, 25, stop_at_eos=False)  # the same template (here the plain transcript)
    assert message.content == expected.text
    assert reply.choices[0].finish_reason == ("stop" if expected.finish_reason == "stop" else "length")
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_list_prompt_and_n(client, model):
    reply = complete(client, model, prompt=["Call me", "Alice was"], n_tokens=8, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # greedy: each pair agrees
    alone = complete(client, model, prompt="Alice was", n_tokens=8).choices[0].text
    assert texts[2] == alone and reply.usage.completion_tokens == 32


def test_seed_makes_sampling_reproducible(client, model):
    def sample(seed):
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed, n=3, extra_body=NO_EOS
        )
        return [c.text for c in reply.choices]

    first = sample(7)
    assert first == sample(7)
    assert len(set(first)) == 3  # each of the n choices draws its own stream
    assert sample(8) != first


def test_stop_string_ends_the_text(client, model):
    full = complete(client, model, n_tokens=40).choices[0].text
    stop = full[10:13]
    reply = complete(client, model, n_tokens=40, stop=["never there", stop])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_completion_logprobs_and_echo(client, model):
    reply = complete(client, model, n_tokens=6, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert lp <= 0 and len(top) <= 3 and lp == pytest.approx(max(top.values()))  # greedy: the most likely
    assert "".join(logprobs.tokens) == reply.choices[0].text
    echoed = complete(client, model, n_tokens=6, logprobs=1, echo=True).choices[0]
    assert echoed.text == PROMPT + reply.choices[0].text
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) > 6
    assert all(lp < 0 for lp in echoed.logprobs.token_logprobs[1:])


def test_chat_logprobs(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2, extra_body=NO_EOS,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_sampling_fields_are_used(client, model):
    base = complete(client, model, n_tokens=30).choices[0].text
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}):
        assert complete(client, model, n_tokens=30, extra_body=extra).choices[0].text != base, extra
    top1 = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=30, temperature=1.5, seed=3, extra_body={**NO_EOS, "top_k": 1}
    )
    assert top1.choices[0].text == base  # top_k = 1 leaves only the argmax


def test_models_health_docs(url, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert httpx.get(f"{url}/health").status_code == 200
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    assert httpx.get(f"{url}/docs").status_code == 200
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "kvgen playground" in page.text and "http" not in page.text.split("<script>")[1]


# Errors -----------------------------------------------------------------------------------------


def post(url, path, body, **kwargs):
    return httpx.post(f"{url}{path}", content=body if isinstance(body, str) else json.dumps(body), **kwargs)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_openai_error_objects(url, model):
    ok = {"model": model, "prompt": PROMPT, "max_tokens": 4}
    assert post(url, "/v1/completions", ok).status_code == 200
    assert_error(post(url, "/v1/completions", "{not json"), 400)
    assert_error(post(url, "/v1/completions", {**ok, "max_tokens": "4"}), 400, "max_tokens")
    assert_error(post(url, "/v1/completions", {**ok, "temperature": "hot"}), 400, "temperature")
    assert_error(post(url, "/v1/completions", {**ok, "temperature": 5}), 400, "temperature")
    assert_error(post(url, "/v1/completions", {**ok, "prompt": ""}), 400, "prompt")
    assert_error(post(url, "/v1/completions", {**ok, "prompt": []}), 400, "prompt")
    assert_error(post(url, "/v1/completions", {**ok, "prompt": [10**9]}), 400, "prompt")
    assert_error(post(url, "/v1/completions", {k: v for k, v in ok.items() if k != "prompt"}), 400, "prompt")
    assert post(url, "/v1/completions", {**ok, "stop": "a stop string longer than four"}).status_code == 200
    assert_error(post(url, "/v1/completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    assert_error(post(url, "/v1/chat/completions", {"model": model, "messages": [{"content": "x"}]}), 400, "messages")
    assert_error(post(url, "/v1/completions", {**ok, "frobnicate": 1}), 400, "frobnicate")
    assert_error(post(url, "/v1/completions", {**ok, "logit_bias": {"5": 10}}), 400, "logit_bias")
    assert_error(post(url, "/v1/completions", {**ok, "suffix": "end"}), 400, "suffix")
    error = assert_error(post(url, "/v1/completions", {**ok, "max_tokens": 300}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and "maximum context length is 256" in error["message"]
    assert_error(post(url, "/v1/completions", {**ok, "model": "gpt-4"}), 404, "model")["code"] == "model_not_found"
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    assert post(url, "/v1/chat/completions", {**chat, "max_tokens": 2}).status_code == 200
    assert_error(post(url, "/v1/chat/completions", {**chat, "messages": []}), 400, "messages")
    assert_error(post(url, "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(url, "/v1/chat/completions", {**chat, "top_logprobs": 2}), 400, "top_logprobs")
    assert_error(post(url, "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), 400, "tools")
    assert_error(httpx.get(f"{url}/v1/nothing"), 404)


COLOURS = {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3}
PAIR = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "boolean"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}


def test_json_schema_requests_in_one_batch_each_validate(client, model):
    """Concurrent chat requests, streamed and not, each with its own schema, share the batch."""
    import jsonschema

    def ask(schema, stream, seed):
        response_format = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
        kwargs = dict(model=model, messages=[{"role": "user", "content": PROMPTS[seed]}], max_tokens=100,
                      temperature=1.0, seed=seed, response_format=response_format)  # fmt: skip
        if not stream:
            choice = client.chat.completions.create(**kwargs).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    jobs = [(COLOURS, False), (PAIR, True), (PAIR, False), (COLOURS, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(*job[1], job[0]), enumerate(jobs)))
    for (schema, _), (text, finish_reason) in zip(jobs, answers):
        assert finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)
    any_json = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=150,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(any_json.choices[0].message.content), dict)  # fmt: skip
    completion = complete(
        client, model, n_tokens=60, extra_body={"ignore_eos": False, "guided_grammar": 'start: "no" | "yes"'}
    )
    assert completion.choices[0].text in ("yes", "no")


def test_structured_output_errors(url, model):
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}

    def schema(s):
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}

    error = assert_error(post(url, "/v1/chat/completions", {**chat, "response_format": schema({"not": {}})}), 400,
                         "response_format")  # fmt: skip
    assert '"not"' in error["message"] and "cannot be enforced" in error["message"]
    error = assert_error(post(url, "/v1/completions", {"model": model, "prompt": "a", "response_format": schema(
        {"type": "string", "format": "phone"})}), 400, "response_format")  # fmt: skip
    assert "phone" in error["message"]
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}}):
        assert_error(post(url, "/v1/chat/completions", {**chat, "response_format": bad}), 400, "response_format")
    both = {**chat, "response_format": {"type": "json_object"}, "ignore_eos": True}
    assert_error(post(url, "/v1/chat/completions", both), 400, "ignore_eos")
    assert_error(post(url, "/v1/completions", {"model": model, "prompt": "a", "guided_grammar": "start: nope"}), 400,
                 "guided_grammar")  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    error = assert_error(post(url, "/v1/chat/completions", {**chat, "tools": tools}), 400, "tools")
    assert "tool support" in error["message"]  # a template-less model cannot be given tools
    assert_error(post(url, "/v1/chat/completions", {**chat, "tool_choice": "required"}), 400, "tool_choice")


def test_openai_client_raises_the_documented_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)


def test_five_stop_strings_are_refused_as_at_most_four(client, model):
    with pytest.raises(openai.BadRequestError, match="at most 4 stop strings") as refused:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, stop=["a", "b", "c", "d", "e"])
    assert refused.value.body["param"] == "stop" and "valid string" not in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="at most 4 stop strings"):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stop=list("abcde")
        )
    assert complete(client, model, n_tokens=2, stop=list("wxyz")).choices[0].finish_reason  # 4 are fine


def test_context_error_names_the_prompt_when_the_prompt_alone_is_too_long(client, model, lm):
    """256 tokens of context: a longer prompt is the prompt's fault whatever max_tokens says; a
    prompt that fits with a max_tokens that does not is max_tokens' fault."""
    long_text = PROMPT + " and so on" * 200
    assert len(lm.encode(long_text)) > 256
    for max_tokens in (None, 1, 50):
        with pytest.raises(openai.BadRequestError, match="your prompt has") as refused:
            client.completions.create(model=model, prompt=long_text, max_tokens=max_tokens)
        assert refused.value.body["param"] == "prompt" and refused.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": long_text}], max_tokens=max_tokens
            )
        assert refused.value.body["param"] == "messages" and "maximum context length" in refused.value.body["message"]
    fits = PROMPT + " and so on" * 20
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model, prompt=fits, max_tokens=250)
    assert refused.value.body["param"] == "max_tokens" and refused.value.body["code"] == "context_length_exceeded"


def request_schema(schema: dict, name: str) -> dict:
    """One request body's schema from /openapi.json, its $refs resolvable."""
    return {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}


def test_openapi_schema_says_what_the_server_does(url, model):
    """Errors documented as 400 (OpenAI's error object), never FastAPI's 422; and for bodies the
    server refuses or takes, the published schema (checked by jsonschema) says the same."""
    import jsonschema

    schema = httpx.get(f"{url}/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
            if method == "post":
                error = operation["responses"]["400"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorResponse"}, path
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert [p.get("minLength", p.get("minItems")) for p in prompt] == [1, 1, 1, 1]
    message = schema["components"]["schemas"]["ChatMessage"]
    assert {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}} in message["anyOf"]
    completion = {"model": model, "prompt": PROMPT, "max_tokens": 2}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("/v1/completions", "CompletionRequest", completion),
        ("/v1/completions", "CompletionRequest", {**completion, "prompt": ""}),
        ("/v1/completions", "CompletionRequest", {**completion, "prompt": []}),
        ("/v1/completions", "CompletionRequest", {**completion, "prompt": [PROMPT, ""]}),
        ("/v1/completions", "CompletionRequest", {**completion, "prompt": [[5, 6], []]}),
        ("/v1/completions", "CompletionRequest", {**completion, "prompt": [-1]}),
        ("/v1/completions", "CompletionRequest", {**completion, "stop": list("abcde")}),
        ("/v1/completions", "CompletionRequest", {**completion, "max_tokens": 0, "echo": True}),
        ("/v1/chat/completions", "ChatRequest", chat),
        ("/v1/chat/completions", "ChatRequest", {**chat, "messages": [{"role": "user"}]}),
        ("/v1/chat/completions", "ChatRequest", {**chat, "messages": [{"role": "user", "content": None}]}),
        ("/v1/chat/completions", "ChatRequest", {**chat, "messages": [{"role": "user", "content": ""}]}),
        ("/v1/chat/completions", "ChatRequest", {**chat, "messages": [{"role": "assistant", "tool_calls": []}]}),
    ]
    for path, name, body in cases:
        valid = jsonschema.Draft202012Validator(request_schema(schema, name)).is_valid(body)
        status = post(url, path, body).status_code
        assert status in (200, 400) and valid == (status == 200), (body, valid, status)


def test_a_wrong_method_is_405_naming_the_allowed_ones(url):
    response = httpx.request("DELETE", f"{url}/v1/completions")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_docs_are_served_from_local_assets(url):
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{url}{page}").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(a.startswith("/") for a in assets), assets
        for asset in assets:
            response = httpx.get(f"{url}{asset}")
            assert response.status_code == 200 and len(response.content) > 1000, asset


# Continuous batching under load -----------------------------------------------------------------


def stream_text(url, model, prompt, n_tokens, stop_after=None) -> str:
    """Stream one greedy completion over raw HTTP; with `stop_after`, hang up after that many chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True, **NO_EOS}
    text, chunks = [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text.append(json.loads(line[6:])["choices"][0]["text"])
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return "".join(text)  # leaving the block closes the connection mid-stream
    return "".join(text)


def metric(url, name) -> float:
    match = re.search(rf"^kvgen_{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(match.group(1))


def test_sixteen_concurrent_streams_equal_their_solo_runs(url, model):
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 20 + 3 * i) for i in range(16)]
    solo = [stream_text(url, model, prompt, n) for prompt, n in jobs]
    started = time.monotonic()
    with ThreadPoolExecutor(17) as pool:
        quitter = pool.submit(stream_text, url, model, PROMPT, 240, 3)  # hangs up after 3 chunks
        together = list(pool.map(lambda job: stream_text(url, model, *job), jobs))
        quitter.result()
    assert together == solo
    assert time.monotonic() - started < 60
    assert metric(url, "batch_size_max") > 1
    deadline = time.monotonic() + 10  # the quitter's row is freed at the engine's next step
    while metric(url, "running_requests") + metric(url, "queue_depth") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_client_that_hangs_up_frees_its_row(url, model):
    """The tiny model decodes its 240 tokens in a fraction of a second, so now and then it has
    finished before the hang-up reaches the engine, and there is nothing left to cancel: then the
    request counts as finished, and the hang-up is tried again."""
    for attempt in range(5):
        cancelled = metric(url, 'requests_total{outcome="cancelled"}')
        finished = metric(url, 'requests_total{outcome="finished"}')
        generated = metric(url, "generation_tokens_total")
        assert len(stream_text(url, model, PROMPT, 240, stop_after=2)) > 0
        deadline = time.monotonic() + 10  # freed at the engine's next step boundary
        while metric(url, "running_requests") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "running_requests") == 0
        if metric(url, 'requests_total{outcome="finished"}') == finished:
            break
    assert metric(url, 'requests_total{outcome="cancelled"}') == cancelled + 1
    assert metric(url, "generation_tokens_total") - generated < 240  # it did not run to the end


def chromium():
    """A headless Chromium driven by selenium."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(flag)
    return webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    )


def playground_chat(url: str, questions: list[str], max_tokens: int = 24, timeout: float = 120) -> tuple[str, str]:
    """Ask `questions` in turn in the playground's chat mode (greedy); returns (output text, stats line)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = chromium()
    try:
        driver.get(url + "/")
        Select(driver.find_element(By.ID, "mode")).select_by_value("chat")
        for field, value in (("temperature", "0"), ("max_tokens", str(max_tokens))):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        for question in questions:
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait = WebDriverWait(driver, timeout)
            wait.until(lambda d: "prompt tokens" in d.find_element(By.ID, "stats").text)
            wait.until(lambda d: not d.find_element(By.ID, "send").get_attribute("disabled"))
        return driver.find_element(By.ID, "output").text, driver.find_element(By.ID, "stats").text
    finally:
        driver.quit()


@pytest.mark.skipif(
    not shutil.which("chromium") or not shutil.which("chromedriver"), reason="make test installs chromium"
)
def test_playground_chat_mode_keeps_the_conversation(url):
    output, stats = playground_chat(url, ["It was the best of times", "Call me Ishmael"], max_tokens=8)
    assert output.count("User: ") == 2 and "error" not in output
    cached = int(re.search(r"\((\d+) cached\)", stats).group(1))
    assert cached > 5  # the second turn reused the first one's tokens


# Prompt-cache reuse -----------------------------------------------------------------------------


def test_shared_prefix_is_reused_and_output_unchanged(client, model, lm):
    system = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 2
    first = complete(client, model, prompt=system + "must be in want of a wife.", n_tokens=12)
    second = complete(client, model, prompt=system + "Call me Ishmael.", n_tokens=12)
    prefix = len(lm.encode(system)) - 1  # the last token of the shared text may merge with the next
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 8 == 0 and cached > prefix - 8 > 20  # whole chunks of 8 (--prefill-chunk)
    assert second.choices[0].text == lm.generate(system + "Call me Ishmael.", 12, stop_at_eos=False).text
    again = complete(client, model, prompt=system + "must be in want of a wife.", n_tokens=12)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens == (again.usage.prompt_tokens - 1) // 8 * 8


def test_chat_turns_reuse_the_earlier_turns(client, model):
    messages = [{"role": "user", "content": "It was the best of times, it was the worst of times."}]
    kwargs = dict(model=model, max_tokens=10, temperature=0, extra_body=NO_EOS)
    first = client.chat.completions.create(messages=messages, **kwargs)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Go on"},
    ]
    second = client.chat.completions.create(messages=messages, **kwargs)
    # the first turn's prompt in whole chunks of 8; its reply was decoded, not prefilled, so it is not kept
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens // 8 * 8 > 0


# A second server: an API key, one row and a one-request queue ---------------------------------


@pytest.fixture(scope="module")
def guarded(gpt2_tiny, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve-guarded") / "serve.log"
    args = ("--api-key", "sesame", "--max-batch", "1", "--max-queue", "1", "--prompt-cache-mb", "0")
    args += ("--max-tokens-limit", "200")
    with running_server(gpt2_tiny, *args, log=log) as base:
        yield base


def test_api_key_required_on_v1(guarded, model):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()
    assert_error(httpx.get(f"{guarded}/v1/models"), 401)
    keyed = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sesame", max_retries=0)
    reply = keyed.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # prompt cache off
    assert httpx.get(f"{guarded}/health").status_code == 200  # outside /v1: no key needed


def test_full_queue_answers_429(guarded, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, **NO_EOS}
    headers = {"Authorization": "Bearer sesame"}
    with ThreadPoolExecutor(6) as pool:
        statuses = list(
            pool.map(lambda _: post(guarded, "/v1/completions", body, headers=headers, timeout=60), range(6))
        )
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    assert_error(next(r for r in statuses if r.status_code == 429), 429)["code"] == "rate_limit_exceeded"


def test_auth_scheme_is_case_insensitive_the_key_is_not(guarded):
    assert httpx.get(f"{guarded}/v1/models", headers={"Authorization": "bearer sesame"}).status_code == 200
    assert_error(httpx.get(f"{guarded}/v1/models", headers={"Authorization": "Bearer SESAME"}), 401)


def test_a_request_larger_than_the_queue_is_400_not_429(guarded, model):
    """429 tells a client to retry (the openai client does, for ever): a request that can never be
    queued is the client's to change."""
    body = {"model": model, "prompt": [PROMPT, PROMPT, PROMPT], "max_tokens": 2}
    error = assert_error(post(guarded, "/v1/completions", body, headers={"Authorization": "Bearer sesame"}), 400)
    assert "queues at most 1" in error["message"] and error["param"] == "prompt"


def test_a_lone_surrogate_is_400_and_the_connection_lives_on(url, model):
    with httpx.Client(base_url=url, timeout=60) as http:
        raw = '{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % model
        error = assert_error(http.post("/v1/completions", content=raw), 400, param="prompt")
        assert "lone surrogate" in error["message"]
        chat = '{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}' % model
        assert_error(http.post("/v1/chat/completions", content=chat), 400, param="messages")
        assert http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_an_abandoned_whole_reply_is_cancelled(guarded, model):
    """A client that gives up on a non-streamed reply (an SDK time-out) frees its row at the next
    step, as a stream's does, instead of generating to the end. The tiny model may finish before
    the hang-up arrives; then it is tried again."""
    headers = {"Authorization": "Bearer sesame"}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, **NO_EOS}
    for attempt in range(5):
        cancelled = metric(guarded, 'requests_total{outcome="cancelled"}')
        generated = metric(guarded, "generation_tokens_total")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{guarded}/v1/completions", json=body, headers=headers, timeout=0.05)
        deadline = time.monotonic() + 10
        while metric(guarded, "running_requests") + metric(guarded, "queue_depth") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if metric(guarded, 'requests_total{outcome="cancelled"}') > cancelled:
            break
    assert metric(guarded, 'requests_total{outcome="cancelled"}') == cancelled + 1
    assert metric(guarded, "generation_tokens_total") - generated < 200


def test_max_tokens_limit_caps_what_a_request_generates(guarded, model):
    headers = {"Authorization": "Bearer sesame"}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 201}
    error = assert_error(post(guarded, "/v1/completions", body, headers=headers), 400, param="max_tokens")
    assert "at most 200" in error["message"] and "--max-tokens-limit" in error["message"]
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, **NO_EOS}
    reply = post(guarded, "/v1/chat/completions", chat, headers=headers)  # no max_tokens: the limit, not the context
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 200


def stalled_request(url: str) -> socket.socket:
    """A connection whose request never finishes arriving: what holds a server's shutdown open."""
    host, port = url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    return stalled


def test_sigterm_stops_the_server_gracefully(gpt2_tiny, tmp_path):
    """SIGTERM: running requests finish, what cannot finish is cancelled after a grace period,
    the process exits with status 0 within seconds; a second signal exits at once."""
    with server_process(gpt2_tiny, log=tmp_path / "a.log") as (process, url), ThreadPoolExecutor(1) as pool:
        body = {"model": str(gpt2_tiny), "prompt": PROMPT, "max_tokens": 200, "temperature": 0, **NO_EOS}
        running = pool.submit(post, url, "/v1/completions", body, timeout=30)
        stalled = stalled_request(url)
        while metric(url, "running_requests") == 0 and not running.done():
            time.sleep(0.01)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert running.result().status_code == 200  # it was running: it finishes
        assert process.wait(timeout=GRACE_SECONDS + 5) == 0
        assert time.monotonic() - signalled < GRACE_SECONDS + 3
        stalled.close()
    with server_process(gpt2_tiny, log=tmp_path / "b.log") as (process, url):
        stalled = stalled_request(url)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # waiting for the stalled request, within its grace period
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0 and time.monotonic() - signalled < 2
        stalled.close()


@pytest.mark.skipif(
    not shutil.which("chromium") or not shutil.which("chromedriver"), reason="make test installs chromium"
)
def test_swagger_ui_renders_the_api_in_headless_chromium(url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        driver.get(url + "/docs")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/completions", "/v1/chat/completions"} <= {p.replace("\u200b", "") for p in paths}
    finally:
        driver.quit()


def test_favicon_is_no_content(url):
    assert httpx.get(f"{url}/favicon.ico").status_code == 204


# Fuzzing and the playground ---------------------------------------------------------------------


def test_schemathesis_finds_no_server_errors(url, tmp_path):
    finished = metric(url, 'requests_total{outcome="finished"}')
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--no-color", "--seed", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"Tested: 6\b", done.stdout) and re.search(r"(\d+) generated, \1 passed", done.stdout)
    assert metric(url, 'requests_total{outcome="finished"}') - finished >= 1  # the fuzzer reached generation


@pytest.mark.skipif(
    not shutil.which("chromium") or not shutil.which("chromedriver"), reason="make test installs chromium"
)
def test_playground_streams_in_headless_chromium(url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        driver.get(url + "/")
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(PROMPT)
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "send").get_attribute("disabled"))
        WebDriverWait(driver, 30).until(lambda d: "prompt tokens" in d.find_element(By.ID, "stats").text)
        tokens = driver.find_elements(By.CSS_SELECTOR, "#output span.tok")
        assert len(tokens) > 5 and all(t.get_attribute("title").startswith("p = ") for t in tokens)
        assert "tok/s" in driver.find_element(By.ID, "stats").text
        assert "error" not in driver.find_element(By.ID, "output").text
        driver.save_screenshot(str(tmp_path / "playground.png"))
    finally:
        driver.quit()
