"""Constrained decoding on a tiny random model: every token the grammar's, documents that validate,
each row of a batch (and of the server's continuous batch) with its own grammar, and refusals that
name what cannot be enforced."""

from __future__ import annotations

import json
import threading

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch
from transformers import AutoTokenizer

import kvgen
from kvgen.grammar import JSON_STYLE
from kvgen.server.engine import Engine, EngineRequest, Failed, Token

# Bounded everywhere (enums, a small integer, few items), so that a random model finishes the document.
PET = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "newt"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["kind", "ok", "n"],
    "additionalProperties": False,
}
COLOURS = {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3}
UNENFORCEABLE = [
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
]


@pytest.fixture(scope="module")
def lm(gpt2_tiny):
    return kvgen.load(gpt2_tiny, dtype="float32")


@pytest.fixture(scope="module")
def reference(gpt2_tiny, lm):
    """llguidance's own tokenizer built from transformers' (not kvgen's path to it)."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tiny)
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=lm.model.config.vocab_size, eos_token=lm.eos_token_ids)


def allowed_prefix(reference, schema: dict, tokens: list[int]) -> int:
    """How many of `tokens`, from the first, a fresh matcher of `schema` accepts."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    return llguidance.LLMatcher(reference, grammar).validate_tokens(tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sampled_token_is_allowed_and_the_document_validates(lm, reference, seed):
    result = lm.generate("It was the best of times", 120, json_schema=PET, temperature=1.0, seed=seed)
    assert result.finish_reason == "eos" and result.token_ids[-1] in lm.eos_token_ids
    assert allowed_prefix(reference, PET, result.token_ids) == len(result.token_ids)
    jsonschema.validate(json.loads(result.text), PET)
    free = lm.generate("It was the best of times", len(result.token_ids), temperature=1.0, seed=seed)
    assert allowed_prefix(reference, PET, free.token_ids) < len(free.token_ids)  # the mask did the work


def test_greedy_streamed_equals_collected(lm):
    pieces = list(lm.stream("Call me Ishmael", 120, json_schema=COLOURS))
    result = lm.generate("Call me Ishmael", 120, json_schema=COLOURS)
    assert "".join(pieces) == result.text and result.finish_reason == "eos"
    jsonschema.validate(json.loads(result.text), COLOURS)


def test_each_row_of_a_batch_keeps_its_own_grammar_state(lm):
    prompts = ["It was the best of times", "Call me", "Alice was beginning to get very tired"]
    results = lm.generate_batch(prompts, 120, json_schema=PET, temperature=1.0, seed=5)
    for r in results:
        assert r.finish_reason == "eos"
        jsonschema.validate(json.loads(r.text), PET)
    alone = lm.generate(prompts[1], 120, json_schema=PET)
    assert lm.generate_batch(prompts, 120, json_schema=PET)[1].token_ids == alone.token_ids


def test_lark_grammar(lm):
    result = lm.generate("It was", 20, grammar='start: ("yes" | "no") "!"')
    assert result.text in ("yes!", "no!") and result.finish_reason == "eos"


@pytest.mark.parametrize("schema, keyword", UNENFORCEABLE)
def test_what_cannot_be_enforced_is_a_value_error_naming_it(lm, schema, keyword):
    with pytest.raises(ValueError, match=f'"{keyword}"'):
        lm.generate("It was", 5, json_schema=schema)


def test_bad_arguments(lm):
    with pytest.raises(ValueError, match="not valid JSON"):
        lm.generate("It was", 5, json_schema="{nope")
    with pytest.raises(ValueError, match="not both"):
        lm.generate("It was", 5, json_schema=PET, grammar='start: "a"')
    with pytest.raises(ValueError, match="EOS"):
        lm.generate("It was", 5, json_schema=PET, stop_at_eos=False)
    with pytest.raises(ValueError, match="native backend"):
        lm.generate("It was", 5, json_schema=PET, speculative="prompt_lookup")


def test_engine_rows_each_follow_their_own_grammar(lm, reference):
    """Rows of the continuous batch: two schemas and an unconstrained row, decoded together."""
    engine = Engine(lm, max_batch=3)
    engine.start()
    try:
        done, events = [threading.Event() for _ in range(3)], [[], [], []]

        def emit(i):
            def on(event):
                events[i].append(event)
                if isinstance(event, Failed) or (isinstance(event, Token) and event.finish_reason):
                    done[i].set()

            return on

        schemas = [PET, COLOURS, None]
        for i, (prompt, schema) in enumerate(zip(["It was the best", "Call me", "Alice was"], schemas)):
            rule = None if schema is None else lm.constraints(1, json_schema=schema)[0]
            params = kvgen.SamplingParams(temperature=1.0, seed=i)
            engine.submit(EngineRequest(lm.encode(prompt), 100, emit(i), params, constraint=rule))
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    for schema, got in zip(schemas[:2], events[:2]):
        tokens = [e.token_id for e in got if isinstance(e, Token)]
        assert got[-1].finish_reason == "stop" and tokens[-1] in lm.eos_token_ids
        assert allowed_prefix(reference, schema, tokens) == len(tokens)
        jsonschema.validate(json.loads("".join(e.text for e in got if isinstance(e, Token))), schema)


def test_cli_json_schema(cli, gpt2_tiny, tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(COLOURS))
    code, out, err = cli(
        "generate", "Call me", "-m", gpt2_tiny, "--dtype", "float32", "-n", "60", "--json-schema", path
    )
    assert code == 0, err
    jsonschema.validate(json.loads(out), COLOURS)
    path.write_text(json.dumps(UNENFORCEABLE[1][0]))
    code, out, err = cli("generate", "Call me", "-m", gpt2_tiny, "--json-schema", path)
    assert code == 2 and err.count("\n") == 1 and "uniqueItems" in err and "Traceback" not in err


def test_mask_leaves_unconstrained_rows_alone():
    from kvgen.grammar import mask_logits

    logits = torch.randn(2, 10)
    assert mask_logits(logits, [None, None]) is logits
