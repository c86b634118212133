"""Constrained decoding: a JSON schema or a grammar becomes a token mask applied before sampling.

The grammar library is llguidance (Microsoft's, also behind vLLM's and SGLang's `guidance`
backend). It was chosen over xgrammar by measurement (benchmarks/bench_grammar.py, docs/json-and-tools.md):
both compute a mask in well under a millisecond on this project's models, but llguidance refuses a
schema keyword it cannot enforce ("Unimplemented keys: ["if", "then"]") where xgrammar compiles the
schema and silently ignores the keyword, which is the failure this module exists to prevent.

A `Constraint` is one row's state: each step it writes the allowed tokens into that row's bitmask
(EOS only where the document is complete), and `advance` consumes the token that was sampled.
`mask_logits` applies a batch's constraints to its (B, vocab) logits; the sampler never knows.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch
from torch import Tensor

# Separators as json.dumps writes them and models read them in their training text; a fixed form
# also keeps a model from filling its whole budget with whitespace, which a flexible one allows.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # kvgen tokenizer -> LLTokenizer


def _llguidance():
    import llguidance
    import llguidance.torch

    return llguidance


def json_schema_grammar(schema: Any) -> str:
    """An llguidance grammar for documents that validate against `schema` (a dict, a bool, or its
    JSON text). ValueError naming what the library cannot enforce."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except Exception as e:  # a schema it cannot even read
        raise ValueError(f"json_schema: {e}") from None
    return check(grammar, "json_schema")


def lark_grammar(text: str, tokenizer: Any = None) -> str:
    """An llguidance grammar from Lark text (llguidance's dialect: `%json {schema}` embeds a schema,
    `<[id]>` a token). Without `tokenizer` (an `ll_tokenizer`) a grammar naming tokens is checked
    only when its `constraints` are made."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("grammar must be non-empty Lark text")
    grammar = _llguidance().LLMatcher.grammar_from_lark(text)
    return grammar if tokenizer is None and "<[" in text else check(grammar, "grammar", tokenizer)


def check(grammar: str, what: str, tokenizer: Any = None) -> str:
    """The grammar, if the library can enforce all of it; else ValueError with its first complaint.

    Warnings count as errors: each one names a part of the schema that would not be enforced.
    """
    failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if failed or messages:
        first = " ".join(str(messages[0]).split()) if messages else "invalid"
        raise ValueError(f"{what} cannot be enforced: {first}")
    return grammar


def grammar_for(json_schema: Any = None, grammar: str | None = None) -> str | None:
    """The one grammar that `json_schema=` or `grammar=` asks for (None for neither)."""
    if json_schema is not None and grammar is not None:
        raise ValueError("give json_schema or grammar, not both")
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    if grammar is not None:
        return lark_grammar(grammar)
    return None


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's view of a kvgen tokenizer, built once per tokenizer (seconds for a 262k vocabulary)."""
    key = (vocab_size, tuple(eos_token_ids))
    held = _tokenizers.get(tokenizer)
    if held is not None and held[0] == key:
        return held[1]
    if tokenizer.transformers is not None:
        raw = tokenizer.transformers.backend_tokenizer
    else:
        raw = tokenizer.backend
    eos = list(eos_token_ids) or [tokenizer.eos_token_id]
    built = _llguidance().LLTokenizer(raw.to_str(), n_vocab=vocab_size, eos_token=eos)
    _tokenizers[tokenizer] = (key, built)
    return built


class Constraint:
    """One row's grammar state: which tokens may come next, given the tokens taken so far."""

    def __init__(self, ll_tokenizer, grammar: str, vocab: int) -> None:
        llg = _llguidance()
        self.vocab = vocab
        self.matcher = llg.LLMatcher(ll_tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(f"grammar cannot be enforced: {self.matcher.get_error()}")
        # Set by the consumer when the row ends (EOS taken): its later tokens are ignored upstream. A
        # finished grammar alone is not the end: its mask then allows EOS only.
        self.done = False

    def fill(self, bitmask: Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 (B, ceil(vocab/32)) bitmask."""
        if self.done:
            bitmask[row] = -1  # every bit set: anything goes, nobody reads it
        else:
            _llguidance().torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, token: int) -> None:
        """Take the sampled token. A token the mask did not allow is a bug here: RuntimeError."""
        if self.done:
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} is not allowed by the grammar: {self.matcher.get_error()}")


def constraints(lm: Any, grammar: str, rows: int) -> list[Constraint]:
    """One fresh `Constraint` per row of `lm`'s output, all following `grammar`."""
    vocab = lm.model.config.vocab_size
    tokenizer = ll_tokenizer(lm.tokenizer, vocab, lm.eos_token_ids)
    check(grammar, "grammar", tokenizer)
    return [Constraint(tokenizer, grammar, vocab) for _ in range(rows)]


def mask_logits(logits: Tensor, rows: list[Constraint | None]) -> Tensor:
    """(B, vocab) logits with every token a row's constraint forbids set to -inf; rows without a
    live constraint unchanged. Float32 logits are masked in place (the model's fresh output, read
    by no one else), others in a float32 copy; either way the masked tensor is returned."""
    live = [i for i, c in enumerate(rows) if c is not None and not c.done]
    if not live:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.full((len(live), (vocab + 31) // 32), -1, dtype=torch.int32)
    for j, i in enumerate(live):
        rows[i].fill(bitmask, j)
    forbidden = ~unpack_bits(bitmask, vocab).to(logits.device)  # (L, vocab)
    with torch.inference_mode(logits.is_inference()):  # the model's logits are inference tensors
        out = logits if logits.dtype == torch.float32 else logits.float()
        if len(live) == logits.shape[0]:
            return out.masked_fill_(forbidden, float("-inf"))
        index = torch.tensor(live, device=logits.device)
        out[index] = out[index].masked_fill(forbidden, float("-inf"))
    return out


def unpack_bits(bitmask: Tensor, vocab: int) -> Tensor:
    """(R, W) int32 bitmask -> (R, vocab) bool: bit t % 32 of word t // 32 allows token t."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (R, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
