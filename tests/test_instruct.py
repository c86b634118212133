"""Chat, JSON output and tools on real models: Qwen2.5-Coder-0.5B-Instruct (the `instruct` extra,
which `make test` installs) and the default Gemma 3 270M base model. The server tests drive a real
`kvgen serve` with the official `openai` client."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest
import torch
from test_server import playground_chat, running_server

import kvgen
from kvgen.chat import render
from kvgen.loading.known import KNOWN_MODELS, known_model_path
from kvgen.tools import template_messages

QWEN = "qwen2.5-coder-0.5b-instruct"
needs_qwen = pytest.mark.skipif(
    not KNOWN_MODELS[QWEN].installed(), reason=f"{QWEN} is not installed: pip install 'kvgen[instruct]'"
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number"},
        "role": {"enum": ["engineer", "designer", "manager"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "nickname": {"type": "string", "maxLength": 20},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "height_m", "role", "address", "skills"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "product": {"type": "string", "maxLength": 20},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 10},
                    "unit": {"enum": ["piece", "kg", "litre"]},
                },
                "required": ["product", "quantity", "unit"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "total_eur": {"type": "number", "minimum": 0},
        "express": {"type": "boolean"},
    },
    "required": ["items", "total_eur"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def threads():
    """The real models run on both cores (conftest keeps tiny ones on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen(threads):
    return kvgen.load(QWEN)


def test_a_known_name_loads_as_its_gguf_does(qwen):
    """By name, the instruct model gets the default path of its GGUF: its own 4-8-bit weights on the
    int kernels wherever this CPU runs those faster (kvgen.runner), not a float copy."""
    from kvgen.loading.dtype import quantized_pays

    assert qwen.runner.quantized == ("gguf" if quantized_pays(qwen.dtype) else None)


@pytest.fixture(scope="module")
def gemma(threads, gemma270m):
    return kvgen.load(gemma270m[1])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    if not KNOWN_MODELS[QWEN].installed():
        pytest.skip(f"{QWEN} is not installed: pip install 'kvgen[instruct]'")
    log = tmp_path_factory.mktemp("serve-qwen") / "serve.log"
    with running_server(QWEN, "--dtype", "auto", "--max-batch", "4", log=log, threads=2) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def gemma_url(tmp_path_factory, gemma270m):
    log = tmp_path_factory.mktemp("serve-gemma") / "serve.log"
    with running_server("gemma3-270m", "--dtype", "auto", log=log, threads=2) as url:  # the default, by name
        yield url


# Chat ---------------------------------------------------------------------------------------------


@needs_qwen
def test_instruct_model_answers_a_simple_question(qwen):
    result = qwen.chat([{"role": "user", "content": "What is the capital of France?"}], 30)
    assert "Paris" in result.text and result.finish_reason == "eos"


def test_base_model_chat_starts_with_bos_and_stops_cleanly(gemma, gemma270m):
    from transformers import AutoTokenizer

    result = gemma.chat([{"role": "user", "content": "What is the capital of France?"}], 40)
    assert result.prompt_ids[0] == AutoTokenizer.from_pretrained(gemma270m[1]).bos_token_id
    assert "Paris" in result.text and result.finish_reason in ("stop", "eos") and "User:" not in result.text


needs_chromium = pytest.mark.skipif(
    not shutil.which("chromium") or not shutil.which("chromedriver"), reason="make test installs chromium"
)


@needs_chromium
def test_playground_chat_on_the_base_model(gemma_url):
    output, _ = playground_chat(gemma_url, ["What is the capital of France?"], max_tokens=24)
    assert "Paris" in output and "error" not in output


@needs_chromium
@needs_qwen
def test_playground_chat_on_the_instruct_model(client):
    output, _ = playground_chat(str(client.base_url).removesuffix("/v1/"), ["What is the capital of France?"])
    assert "Paris" in output and "error" not in output


@needs_qwen
def test_prompt_ids_equal_transformers_on_the_gguf(qwen):
    """Special tokens and all, tools and a tool result included: transformers reading the GGUF itself."""
    from transformers import AutoTokenizer

    path = known_model_path(QWEN)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": -3}'},
    ]
    for tools in (None, [WEATHER]):
        ours = render(qwen, template_messages(messages), qwen.tokenizer.chat_template, tools)
        theirs = reference.apply_chat_template(
            template_messages(messages), tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert ours == list(theirs)
    assert ours.count(reference.convert_tokens_to_ids("<|im_start|>")) == 5


@pytest.mark.parametrize("which", ["gemma", pytest.param("qwen", marks=needs_qwen)])
def test_each_later_turn_prefills_only_its_new_tokens(which, request):
    lm = request.getfixturevalue(which)
    session = lm.chat_session()
    list(session.send("What is the capital of France?", 24))
    for question in ("And of Italy?", "And of Spain?"):
        held = session.cached_ids
        list(session.send(question, 24))
        prompt = render(lm, session.messages[:-1], session.template)
        assert prompt[: len(held)] == held  # every token the cache held was reused
        assert session.last_prefill_tokens == len(prompt) - len(held) < 20


# JSON output --------------------------------------------------------------------------------------


@needs_qwen
@pytest.mark.parametrize(
    "schema, sampled, stream",
    [(PERSON, False, False), (PERSON, True, True), (ORDER, False, True), (ORDER, True, False)],
    ids=["person-greedy", "person-sampled-streamed", "order-greedy-streamed", "order-sampled"],
)
def test_json_schema_output_validates(client, schema, sampled, stream):
    ask = "a software engineer who lives in Berlin" if schema is PERSON else "an order of apples and milk"
    kwargs = dict(
        model=QWEN,
        messages=[{"role": "user", "content": f"Describe {ask} as JSON."}],
        max_tokens=250,
        temperature=0.8 if sampled else 0,
        seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
    )
    if stream:
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        text, finish_reason = (
            "".join(c.choices[0].delta.content or "" for c in chunks),
            chunks[-1].choices[0].finish_reason,
        )
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, finish_reason = choice.message.content, choice.finish_reason
    assert finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


@needs_qwen
def test_python_chat_with_a_schema(qwen):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30}}, "required": ["capital"]}
    result = qwen.chat(
        [{"role": "user", "content": "What is the capital of France? JSON please."}], 40, json_schema=schema
    )
    assert json.loads(result.text)["capital"] == "Paris"


# Tools --------------------------------------------------------------------------------------------


def streamed_reply(chunks) -> tuple[str, list[dict], str]:
    """(content, tool_calls, finish_reason) gathered from chat completion chunks, as clients do."""
    content, calls, finish_reason = [], {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for call in delta.tool_calls or []:
            held = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            held["name"] += call.function.name or ""
            held["arguments"] += call.function.arguments or ""
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return "".join(content), [calls[i] for i in sorted(calls)], finish_reason


@needs_qwen
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_conversation_through_the_openai_client(client, stream):
    messages = [
        {
            "role": "system",
            "content": "You are a helpful assistant. Reply to the user in one plain sentence, using the tool results.",
        },
        {"role": "user", "content": "What's the weather in Paris right now?"},
    ]
    choice = "required" if not stream else {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=QWEN, tools=[WEATHER], max_tokens=120, temperature=0)
    if stream:
        _, calls, finish_reason = streamed_reply(
            client.chat.completions.create(messages=messages, tool_choice=choice, stream=True, **kwargs)
        )
    else:
        reply = client.chat.completions.create(messages=messages, tool_choice=choice, **kwargs).choices[0]
        finish_reason = reply.finish_reason
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in reply.message.tool_calls
        ]
    assert finish_reason == "tool_calls" and len(calls) == 1
    call = calls[0]
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert call["name"] == "get_weather" and call["id"].startswith("call_") and "paris" in arguments["city"].lower()

    result = {"city": "Paris", "temperature_c": 23, "sky": "light rain"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        ]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)},
    ]  # fmt: skip
    # The answer, asked for without further calls and as {"answer": ...}: this 0.5B model, free to
    # write, repeats its call (a bigger one answers in plain words under tool_choice "auto").
    answer = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 160}}, "required": ["answer"]}
    kwargs["tool_choice"] = "none"
    kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}}
    if stream:
        content, calls, finish_reason = streamed_reply(
            client.chat.completions.create(messages=messages, stream=True, **kwargs)
        )
    else:
        reply = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        content, calls, finish_reason = reply.message.content, reply.message.tool_calls or [], reply.finish_reason
    assert finish_reason == "stop" and not calls
    text = json.loads(content)["answer"]
    assert "23" in text and "rain" in text  # only the tool's result could have told it
