"""Request bodies of the OpenAI API, as pydantic models: types and ranges checked before any work.

Wrong types are refused, never coerced (`strict`), and so are unknown fields, as OpenAI's API
does ("Unrecognized request argument supplied"). Fields OpenAI knows that change nothing here
(`user`, `store`, `metadata`, ...) are accepted and ignored; fields whose effect this server does
not provide (`logit_bias`, `suffix`, ...) are accepted only at their neutral value and
refused otherwise (`unsupported`), so a request is never silently misread.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_STOP = 4  # OpenAI takes up to 4 stop strings


def _at_most_four(stop: Any) -> Any:
    # Checked before the union is tried: otherwise the error named is the first member's
    # ("stop.str: Input should be a valid string"), not the list's length.
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings are allowed, not {len(stop)}")
    return stop


Stop = Annotated[str | Annotated[list[str], Field(max_length=MAX_STOP)] | None, BeforeValidator(_at_most_four)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# OpenAI's four prompt forms, none of them empty (an empty prompt leaves nothing to continue).
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share: OpenAI's, plus vLLM's top_k, min_p, repetition_penalty and ignore_eos."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM's: 0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Stop = None
    n: int | None = Field(None, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as by OpenAI
    logit_bias: dict[str, float] | None = None  # unsupported unless empty


class CompletionRequest(_Sampling):
    prompt: Prompt = Field(..., description="text, texts, token ids (each below the vocabulary size), or lists of them")
    max_tokens: int | None = Field(
        None, ge=0, description="0 generates nothing: with echo, the prompt's logprobs alone (scoring)"
    )
    response_format: dict[str, Any] | None = Field(None, description="as in chat: json_object or json_schema")
    guided_grammar: str | None = Field(None, description="vLLM's: a Lark grammar (llguidance's dialect)")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None  # unsupported
    best_of: int | None = Field(None, ge=1, le=16)  # only best_of == n is supported


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message has content, or tool calls instead (an assistant's earlier turn)."""

    # The rule below, in JSON schema, so that the published schema refuses what the server refuses.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
            ]
        },
    )
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs 'content' (an assistant's may have 'tool_calls' instead)")
        return self


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    store: bool | None = None  # ignored: nothing is stored
    metadata: dict[str, str] | None = None  # ignored
    service_tier: str | None = None  # ignored
    parallel_tool_calls: bool | None = None  # default true
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {...}}]
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required" or a named function
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema
    modalities: list[str] | None = None  # only ["text"]


def unsupported(body: _Sampling) -> tuple[str, str] | None:
    """(field, message) for the first field set to something this server cannot do, else None."""
    checks = [
        ("logit_bias", bool(body.logit_bias)),
        ("suffix", getattr(body, "suffix", None) is not None),
        ("best_of", getattr(body, "best_of", None) not in (None, body.n or 1)),
        ("modalities", getattr(body, "modalities", None) not in (None, ["text"])),
    ]
    for name, refused in checks:
        if refused:
            return name, f"'{name}' with this value is not supported by this server (kvgen)"
    return None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every error this server answers has this shape (validation errors too, as 400)."""

    error: ErrorDetail
