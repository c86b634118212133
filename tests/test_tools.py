"""Tool calls without a model: reading `<tool_call>` blocks, what streaming holds back, tool_choice,
and the grammar a required call follows; and known models assembled from their packages."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

import kvgen
from kvgen.loading import known
from kvgen.tools import call_grammar, choose, open_prefix, parse_calls, template_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CLOCK = {"type": "function", "function": {"name": "now"}}


def test_parse_calls_reads_every_block_and_keeps_the_rest_as_content():
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>'
    )
    content, calls = parse_calls(text, [WEATHER, CLOCK])
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("now", {}),
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert len(parse_calls(text, [WEATHER, CLOCK], parallel=False)[1]) == 1


def test_parse_calls_leaves_what_is_not_a_call_alone():
    for text in ("Just words.", "<tool_call>\n{not json}\n</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'):
        assert parse_calls(text, [WEATHER]) == (text, [])
    bare = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'  # small models leave the tags out
    assert parse_calls(bare, [WEATHER])[1][0]["function"]["name"] == "get_weather"
    assert parse_calls('{"name": "unknown", "arguments": {}}', [WEATHER])[1] == []


def test_streaming_holds_back_only_what_may_be_a_call():
    assert open_prefix("Hello there") == len("Hello there")
    assert open_prefix("Hello <tool") == len("Hello ")
    assert open_prefix("Hello <tool_call>\n{") == len("Hello ")
    assert open_prefix("a < b") == len("a < b")
    assert open_prefix('  {"name"') == 0


def test_tool_choice():
    assert choose(None, None) == ("none", [])
    assert choose([WEATHER, CLOCK], None) == ("auto", [WEATHER, CLOCK])
    assert choose([WEATHER, CLOCK], "required")[0] == "required"
    assert choose([WEATHER, CLOCK], {"type": "function", "function": {"name": "now"}}) == ("required", [CLOCK])
    for tools, tool_choice, message in [
        (None, "required", "needs tools"),
        ([WEATHER], "sometimes", "one of"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among"),
        ([{"type": "function", "function": {"name": "bad name"}}], None, "letters"),
        ([WEATHER, WEATHER], None, "twice"),
        ([{"type": "retrieval"}], None, "'type': 'function'"),
    ]:
        with pytest.raises(ValueError, match=message):
            choose(tools, tool_choice)


def test_template_messages_turn_arguments_into_objects():
    call = {"id": "c", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}}
    (m,) = template_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert m["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"} and m["content"] == ""
    with pytest.raises(ValueError, match="JSON"):
        template_messages([{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{"}}]}])


def test_required_call_grammar_accepts_calls_and_refuses_the_rest(gpt2_tiny):
    import llguidance.hf
    from transformers import AutoTokenizer

    lm = kvgen.load(gpt2_tiny, dtype="float32")
    hf = AutoTokenizer.from_pretrained(gpt2_tiny)
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=lm.model.config.vocab_size)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "count", "parameters": schema}}, CLOCK]
    grammar = call_grammar(tools, lm.tokenizer)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        ids = hf.encode(text)
        if matcher.validate_tokens(ids) < len(ids):  # checks without taking them
            return False
        matcher.consume_tokens(ids)
        return matcher.is_accepting()

    assert accepts('<tool_call>\n{"name": "count", "arguments": {"n": 3}}\n</tool_call>')
    assert accepts('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "count", "arguments": {"n": 1}}\n</tool_call>')  # fmt: skip
    assert not accepts('<tool_call>\n{"name": "count", "arguments": {"n": "3"}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>')
    assert not accepts("Sure!")
    with pytest.raises(ValueError, match="uniqueItems"):
        call_grammar(
            [{"type": "function", "function": {"name": "f", "parameters": {"uniqueItems": True}}}], lm.tokenizer
        )


# Known models -------------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Two data packages on sys.path whose parts make a known model `toy`; the kvgen cache in tmp_path."""
    chunks = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30]
    for n, chunk in enumerate(chunks, 1):
        package = tmp_path / "site" / f"toy_part{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{n:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    model = known.KnownModel(
        "toy", "a toy", "toy.gguf", hashlib.sha256(whole).hexdigest(),
        (("toy_part1", "data/part01.bin"), ("toy_part2", "data/part02.bin")), "toy",
    )  # fmt: skip
    monkeypatch.setitem(known.KNOWN_MODELS, "toy", model)
    return whole, model


def test_a_known_model_is_assembled_once_and_verified(parts, tmp_path, monkeypatch):
    whole, model = parts
    path = known.known_model_path("toy")
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache" / "models"
    assert [p.name for p in path.parent.iterdir()] == ["toy.gguf"]  # no temporary file left behind
    stamp = path.stat().st_mtime_ns
    assert known.known_model_path("toy").stat().st_mtime_ns == stamp  # not assembled again
    path.unlink()
    monkeypatch.setitem(known.KNOWN_MODELS, "toy", known.KnownModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        known.known_model_path("toy")
    assert list(path.parent.iterdir()) == []  # a file that failed its check is never left in place


def test_a_missing_known_model_says_how_to_install_it(cli, monkeypatch, parts):
    _, model = parts
    monkeypatch.setitem(
        known.KNOWN_MODELS, "toy", known.KnownModel(**{**model.__dict__, "parts": (("toy_part9", "x.bin"),)})
    )
    sys.modules.pop("toy_part9", None)
    assert not known.KNOWN_MODELS["toy"].installed()
    code, out, err = cli("info", "toy")
    assert code == 2 and err.strip() == "kvgen: error: model 'toy' is not installed: pip install 'kvgen[toy]'"
    code, out, err = cli("models")
    assert code == 0 and "qwen2.5-coder-0.5b-instruct" in out and "gemma3-270m" in out
    assert "toy" in out and "not installed: pip install 'kvgen[toy]'" in out
