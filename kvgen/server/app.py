"""The OpenAI-compatible HTTP API over the engine: routes, response shapes, error objects.

Handlers tokenize and validate on the event loop, hand one `EngineRequest` per choice to the
engine thread, and read its events from an asyncio queue: collected into one response, or sent
as Server-Sent Events as they come (`stream`). Every error is OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from ..chat import chat_template, render
from ..grammar import json_schema_grammar, lark_grammar
from ..sampling import SamplingParams
from ..text import IncrementalDecoder
from ..tools import call_grammar, choose, open_prefix, parse_calls, supports_tools, template_messages
from .engine import Engine, EngineRequest, Event, Failed, QueueFull, Started, Token
from .schemas import ChatRequest, CompletionRequest, ErrorResponse, unsupported

log = logging.getLogger("kvgen.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
# The error responses the OpenAPI schema documents; validation errors are among the 400s (not FastAPI's 422).
ERRORS = {
    400: "Invalid request: not JSON, a field of the wrong type or out of range, an unknown field, too long a prompt",
    401: "Missing or wrong API key (when the server has one)",
    404: "No such model",
    429: "The queue is full: retry later",
}


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


@dataclass
class Choice:
    """One engine request's results as they arrive."""

    index: int
    prompt_ids: list[int]
    request: EngineRequest | None = None
    started: Started | None = None
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    queue: asyncio.Queue | None = None  # shared by every choice of one HTTP request

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


class Server:
    """The routes' shared state: the engine, the model's name, and a lock around the tokenizer's encoder."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int | None = None) -> None:
        self.engine, self.lm, self.model_name = engine, engine.lm, model_name
        self.max_tokens_limit = max_tokens_limit  # generated tokens a request may ask for, at most
        self.created = int(time.time())
        self.encode_lock = threading.Lock()  # fast tokenizers refuse concurrent encodes that reconfigure them
        self.template, self.template_stops = chat_template(self.lm)
        # Rendered once now, so that the first chat request does not wait for the renderer to load. A
        # template may refuse this one-message conversation; each request reports its own errors.
        with suppress(Exception):
            render(self.lm, [{"role": "user", "content": "Hi"}], self.template)

    # Input ---------------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )

    def prompt_ids(self, prompt: Any) -> list[list[int]]:
        """OpenAI's four prompt forms (none empty: `CompletionRequest` checks) -> token ids per prompt."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        vocab = self.lm.model.config.vocab_size
        out = []
        for p in prompt:
            if isinstance(p, str):
                check_text(p, "prompt")
                with self.encode_lock:
                    ids = self.lm.tokenizer.encode(p)
            else:
                ids = list(p)
                if any(not 0 <= i < vocab for i in ids):
                    raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            if not ids:  # text that the tokenizer drops entirely
                raise APIError(400, "prompt must not be empty", param="prompt")
            out.append(ids)
        return out

    def chat_ids(self, body: ChatRequest, tools: list[dict] | None = None) -> list[int]:
        messages = []
        for m in body.messages:
            content = (
                m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            )
            if content is not None:
                check_text(content, "messages")
            message = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                message["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        try:
            messages = template_messages(messages)
            with self.encode_lock:
                ids = render(self.lm, messages, self.template, tools)
        except Exception as e:  # the template's own raise_exception (e.g. roles must alternate)
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        if not ids:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        return ids

    def tools(self, body: ChatRequest) -> tuple[str, list[dict]]:
        """(mode, callable tools) of a chat request; a 400 for bad tools or a template without tool support."""
        try:
            mode, callable_tools = choose(body.tools or None, body.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
        if mode != "none" and not supports_tools(self.template):
            raise APIError(
                400,
                f"the model {self.model_name} has no chat template with tool support (tools rendered and "
                "<tool_call> syntax): it cannot be given tools",
                param="tools",
            )
        return mode, callable_tools

    async def grammar(self, body, tools: tuple[str, list[dict]] = ("none", [])) -> str | None:
        """The grammar a request asks for (response_format, guided_grammar, or a required tool
        call), checked against the model's tokenizer; a 400 naming what cannot be enforced."""
        mode, callable_tools = tools
        schema = response_format_schema(body.response_format)
        lark = getattr(body, "guided_grammar", None)
        given = [("response_format", schema), ("guided_grammar", lark), ("tools", mode if mode != "none" else None)]
        wanted = [name for name, value in given if value is not None]
        if len(wanted) > 1:
            raise APIError(400, f"'{wanted[1]}' cannot be combined with '{wanted[0]}'", param=wanted[1])
        if not wanted or mode == "auto":  # "auto" leaves the model free; its calls are read afterwards
            return None
        if body.ignore_eos:
            raise APIError(400, "a constrained reply ends with EOS: ignore_eos cannot be set", param="ignore_eos")
        try:
            if mode == "required":
                grammar = call_grammar(callable_tools, self.lm.tokenizer, body.parallel_tool_calls is not False)
            elif lark is not None:
                grammar = lark_grammar(lark)
            else:
                grammar = json_schema_grammar(schema)
            # The first grammar builds the tokenizer's index (seconds for a large vocabulary): off the event loop.
            await asyncio.to_thread(self.lm.constraints, 1, grammar=grammar)
        except ValueError as e:
            raise APIError(400, str(e), param=wanted[0]) from None
        return grammar

    def max_tokens(self, asked: int | None, prompt_len: int, default: int | None, param: str, prompt_param: str) -> int:
        """What to generate: as asked, else `default`, else (and at most) the context left, as vLLM
        does; never more than the server's `max_tokens_limit`, which also caps what goes unasked.

        A 400 names `prompt_param` when the prompt alone leaves no room (0 tokens asked: when it
        does not fit), and `param` when the prompt fits but the tokens asked do not.
        """
        context, limit = self.engine.context_length, self.max_tokens_limit
        left = context - prompt_len
        if left < (0 if asked == 0 else 1):
            room = "does not fit in it" if asked == 0 else "leaves no room for a completion"
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, your prompt has "
                f"{prompt_len} tokens, which {room}. Please reduce the length of the prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        wanted = asked if asked is not None else min(default or left, left, limit or left)
        if wanted > left:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} in the completion). "
                "Please reduce the length of the prompt or completion.",
                param=param,
                code="context_length_exceeded",
            )
        if limit is not None and wanted > limit:
            raise APIError(
                400,
                f"{param} is {wanted}; this server generates at most {limit} tokens a request (--max-tokens-limit)",
                param=param,
            )
        return wanted

    def sampling(self, body, index: int) -> SamplingParams:
        seed = None if body.seed is None else (body.seed + index) % 2**63  # each of n choices its own stream
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
                top_k=max(body.top_k or 0, 0),
                top_p=1.0 if body.top_p is None else body.top_p,
                min_p=body.min_p or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0,
                seed=seed,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # Running -------------------------------------------------------------------------------------

    def submit(
        self,
        body,
        prompts: list[list[int]],
        max_tokens: list[int],
        stop: list[str],
        grammar: str | None = None,
        **extra,
    ) -> list[Choice]:
        """One engine request per prompt and choice (OpenAI's order: prompt-major), events into one
        queue; each with its own state of `grammar`, if one is given."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        n = body.n or 1
        if len(prompts) * n > self.engine.max_queue:  # could never be queued: retrying cannot help
            raise APIError(
                400,
                f"this request asks for {len(prompts) * n} completions; this server queues at most "
                f"{self.engine.max_queue} (--max-queue)",
                param="n" if n > 1 else "prompt",
            )
        choices = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                index = p * n + j

                def emit(event: Event, index: int = index) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))

                choice = Choice(index, ids)
                choice.request = EngineRequest(
                    ids,
                    max_tokens[p],
                    emit,
                    self.sampling(body, j),
                    body.presence_penalty or 0.0,
                    body.frequency_penalty or 0.0,
                    stop,
                    not body.ignore_eos,
                    constraint=None if grammar is None else self.lm.constraints(1, grammar=grammar)[0],
                    **extra,
                )
                choices.append(choice)
        try:
            for choice in choices:
                self.engine.submit(choice.request)
        except QueueFull:
            cancel(choices)
            raise APIError(
                429,
                "The server is busy: too many requests are waiting. Retry later.",
                "requests",
                code="rate_limit_exceeded",
            ) from None
        for choice in choices:
            choice.queue = queue
        return choices


def cancel(choices: list[Choice]) -> None:
    for choice in choices:
        if choice.request is not None:
            choice.request.cancel()


async def events(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Event]]:
    """Each choice's events as they come, until every choice has finished or failed; leaving early
    (a client gone) cancels the rest at the engine's next step."""
    queue = choices[0].queue
    remaining = len(choices)
    try:
        while remaining:
            index, event = await queue.get()
            choice = choices[index]
            if isinstance(event, Started):
                choice.started = event
                if choice.request.max_tokens == 0:  # echo's scoring idiom: the prompt is the whole answer
                    choice.finish_reason = "length"
            elif isinstance(event, Token):
                choice.tokens.append(event)
                choice.finish_reason = event.finish_reason
            elif isinstance(event, Failed):
                choice.error = event.message
            if choice.finish_reason or choice.error:
                remaining -= 1
            yield choice, event
    finally:
        cancel([c for c in choices if not (c.finish_reason or c.error)])


async def unless_disconnected(request: Request, reply: Awaitable[dict]) -> dict | Response:
    """Await a whole (non-streamed) reply unless its client hangs up first: then the reply is
    cancelled, and with it its engine requests at the next step (`events`), as a stream's are.
    Starlette watches a stream's connection itself; a plain response's, nobody does."""
    work = asyncio.ensure_future(reply)
    gone = asyncio.ensure_future(hung_up(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        gone.cancel()
        return work.result()
    work.cancel()
    with suppress(asyncio.CancelledError):
        await work
    return Response(status_code=499)  # nginx's "client closed request": no one is there to read it


async def hung_up(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: what else arrives is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(choices: list[Choice]) -> dict:
    """Prompt tokens once per prompt (as OpenAI counts them), completion tokens over every choice."""
    firsts = {}
    for c in choices:
        firsts.setdefault(id(c.prompt_ids), c)
    prompt = sum(len(c.prompt_ids) for c in firsts.values())
    cached = sum(c.started.cached_tokens for c in firsts.values() if c.started is not None)
    completion = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


def server_error(message: str) -> APIError:
    return APIError(500, f"The server had an error while processing your request: {message}", "server_error")


def check_text(text: str, param: str) -> None:
    """A 400 for text that is not Unicode a tokenizer can take: a lone surrogate (JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"{param} is not valid Unicode text: a lone surrogate at character {e.start}", param=param
        ) from None


def telling(errors: list[dict]) -> dict:
    """The validation error to report: where a union's members all failed, one that failed on the
    value, not the type (an empty prompt is too short, not "should be a list")."""
    if not errors:
        return {"loc": (), "msg": "invalid request", "type": "invalid"}
    return next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])


def error_responses(*codes: int, keyed: bool) -> dict:
    """OpenAPI `responses` for these error codes (all of ERRORS by default); 401 only where a key is set."""
    codes = codes or tuple(ERRORS)
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes if c != 401 or keyed}


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, max_tokens_limit: int | None = None
) -> FastAPI:
    """The FastAPI application; the engine thread starts and stops with it. `max_tokens_limit` caps
    the tokens one request generates, so that no request holds a row for a whole context."""
    server = Server(engine, model_name, max_tokens_limit)
    keyed = bool(api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    # /docs and /redoc with Swagger UI's and ReDoc's files served from the fastapi-offline package:
    # FastAPI's own pages load them from a CDN, and are blank offline.
    app = FastAPIOffline(title="kvgen", summary="OpenAI-compatible text generation", version="0.1.0", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # the scheme is case-insensitive (RFC 9110), the key is not
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key").response()
        if request.method == "POST":  # bodies are JSON whatever the Content-Type says (`curl -d` says a form)
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = headers + [(b"content-type", b"application/json")]
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = telling(e.errors())
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"The request body is not valid JSON: {first.get('msg')}").response()
        if first.get("type") == "extra_forbidden":
            return APIError(400, f"Unrecognized request argument supplied: {loc[-1]}", param=loc[-1]).response()
        # Field names and indices, not the names pydantic makes up for union members ("constrained-str")
        where = ".".join(p for p in loc if p.isidentifier() or p.isdigit()) or "body"
        message = first.get("msg")
        if first.get("type") == "value_error":  # our own validators' words, without pydantic's "Value error, "
            message = str(first["ctx"]["error"])
        elif first.get("type") == "string_unicode":  # what a constrained str says of "\ud800"; see check_text
            message = "not valid Unicode text: a lone surrogate"
        return APIError(400, f"{where}: {message}", param=loc[0] if loc else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        response = APIError(e.status_code, str(e.detail), "invalid_request_error").response()
        response.headers.update(e.headers or {})  # a 405's Allow, which HTTP requires
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("request failed")
        return server_error(type(e).__name__).response()

    @app.get("/health", summary="200 while the engine is serving")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The one model this server serves", responses=error_responses(401, keyed=keyed))
    async def models() -> dict:
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{model:path}", summary="One model", responses=error_responses(401, 404, keyed=keyed))
    async def model(model: str) -> dict:
        server.check_model(model)
        return model_card(server)

    @app.post(
        "/v1/completions", summary="OpenAI completions: continue a prompt", responses=error_responses(keyed=keyed)
    )
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        check_unsupported(body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens 0 generates nothing: it needs echo (the prompt's logprobs)", param="max_tokens"
            )
        prompts = server.prompt_ids(body.prompt)
        max_tokens = [
            server.max_tokens(body.max_tokens, len(p), COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens", "prompt")
            for p in prompts
        ]
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        grammar = await server.grammar(body)
        choices = server.submit(
            body,
            prompts,
            max_tokens,
            stop,
            grammar,
            logprobs=body.logprobs,
            prompt_logprobs=bool(body.echo and body.logprobs is not None),
        )
        reply = CompletionReply(server, body, choices)
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await unless_disconnected(request, reply.collect())

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI chat completions: reply to a conversation (the model's chat template)",
        responses=error_responses(keyed=keyed),
    )
    async def chat_completions(body: ChatRequest, request: Request):
        server.check_model(body.model)
        check_unsupported(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        tools = server.tools(body)
        grammar = await server.grammar(body, tools)
        ids = server.chat_ids(body, body.tools if tools[0] != "none" else None)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = server.max_tokens(asked, len(ids), None, "max_completion_tokens", "messages")
        stop = ([body.stop] if isinstance(body.stop, str) else list(body.stop or [])) + server.template_stops
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices = server.submit(body, [ids], [max_tokens], stop, grammar, logprobs=logprobs)
        reply = ChatReply(server, body, choices, tools)
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await unless_disconnected(request, reply.collect())

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for one; the playground has none: "no content", not a 404
        return Response(status_code=204)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("kvgen.server").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("__MODEL__", json.dumps(model_name)))

    schema_of = app.openapi

    def openapi() -> dict:
        """The generated schema, naming the one model served (clients and fuzzers then send it), and
        without FastAPI's 422: this server answers invalid requests with 400 and OpenAI's error object."""
        schema = schema_of()
        for name in ("CompletionRequest", "ChatRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        return schema

    app.openapi = openapi
    return app


def response_format_schema(response_format: dict | None) -> dict | bool | None:
    """The JSON schema OpenAI's `response_format` asks for (None for plain text); a 400 if malformed."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text" and len(response_format) == 1:
        return None
    if kind == "json_object" and len(response_format) == 1:
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if kind == "json_schema" and isinstance(spec, dict) and set(response_format) == {"type", "json_schema"}:
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise APIError(400, "response_format.json_schema.name must be a non-empty string", param="response_format")
        extra = set(spec) - {"name", "schema", "strict", "description"}
        if extra:
            raise APIError(400, f"response_format.json_schema: unknown field {sorted(extra)[0]!r}",
                           param="response_format")  # fmt: skip
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise APIError(
                400, "response_format.json_schema.schema must be a JSON schema object", param="response_format"
            )
        return schema
    raise APIError(
        400,
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}, 'strict': ...}}",
        param="response_format",
    )


def check_unsupported(body) -> None:
    refused = unsupported(body)
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])


def model_card(server: Server) -> dict:
    return {
        "id": server.model_name,
        "object": "model",
        "created": server.created,
        "owned_by": "kvgen",
        "max_model_len": server.engine.context_length,
    }


class _Reply:
    """A response under construction from the choices' events: collected whole, or streamed."""

    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, server: Server, body, choices: list[Choice]) -> None:
        self.server, self.body, self.choices = server, body, choices
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def token_text(self, token_id: int) -> str:
        return self.server.lm.tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.server.model_name}

    async def collect(self) -> dict:
        async for _ in events(self.choices):
            pass
        failed = [c.error for c in self.choices if c.error]
        if failed:
            raise server_error(failed[0])
        return {
            **self.head(self.object),
            "choices": [self.choice(c) for c in self.choices],
            "usage": usage(self.choices),
            "system_fingerprint": None,
        }

    async def stream(self) -> AsyncIterator[str]:
        async for choice, event in events(self.choices):
            if isinstance(event, Failed):
                yield sse({"error": error_doc(event.message)})
                continue
            for delta in self.deltas(choice, event):
                chunk = {**self.head(self.chunk_object), "choices": [delta], "system_fingerprint": None}
                if self.include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
        if self.include_usage:
            yield sse({**self.head(self.chunk_object), "choices": [], "usage": usage(self.choices)})
        yield sse("[DONE]")


def error_doc(message: str) -> dict:
    e = server_error(message)
    return {"message": e.message, "type": e.type, "param": None, "code": None}


def text_offsets(pieces: list[str], start: int = 0) -> list[int]:
    """Where each piece begins in the text that the pieces join to, that text beginning at `start`."""
    offsets = []
    for piece in pieces:
        offsets.append(start)
        start += len(piece)
    return offsets


class CompletionReply(_Reply):
    """Completions. With `logprobs`, each token's `text_offset` indexes the returned `text`, which
    evaluation harnesses rely on to find where a continuation's tokens begin: a prompt token's is
    the length of the whole characters that the tokens before it decode to in that text (a BOS
    adds none), a generated token's where the text that came with it begins (as streamed)."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, server: Server, body, choices: list[Choice]) -> None:
        super().__init__(server, body, choices)
        self.echoed: dict[int, tuple[str, list[int]]] = {}  # per choice: the echoed prompt, its tokens' offsets

    def logprobs(self, entries: list[tuple[int, float | None, list]], offsets: list[int]) -> dict:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        return {
            "tokens": [self.token_text(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {self.token_text(i): v for i, v in top} for _, lp, top in entries],
            "text_offset": offsets,
        }

    def prompt_entries(self, choice: Choice) -> list[tuple[int, float | None, list]]:
        scored = choice.started.prompt_logprobs or [(None, [])] * len(choice.prompt_ids)
        return [(t, lp, top) for t, (lp, top) in zip(choice.prompt_ids, scored)]

    def echo(self, choice: Choice) -> tuple[str, list[int]]:
        """The prompt's text, decoded as generated text is, and each prompt token's offset in it:
        the whole characters that the tokens before it decode to."""
        if choice.index not in self.echoed:
            decoder = IncrementalDecoder(self.server.lm.tokenizer, [])
            text, held, offsets = "", "", []
            for token in choice.prompt_ids:
                offsets.append(len(text) + len(held))
                piece = decoder.add(token)
                text += piece
                held = "" if piece else decoder.held()
            self.echoed[choice.index] = text + decoder.flush(), offsets  # ids may end inside a character
        return self.echoed[choice.index]

    def prompt_text(self, choice: Choice) -> str:
        return self.echo(choice)[0]

    def choice(self, c: Choice) -> dict:
        prompt = self.prompt_text(c) if self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            entries = [(t.token_id, t.logprob, t.top_logprobs) for t in c.tokens]
            offsets = text_offsets([t.text for t in c.tokens], len(prompt))
            if self.body.echo:
                entries = self.prompt_entries(c) + entries
                offsets = self.echo(c)[1] + offsets
            logprobs = self.logprobs(entries, offsets)
        return {"index": c.index, "text": prompt + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def deltas(self, choice: Choice, event: Event) -> list[dict]:
        if isinstance(event, Started):
            if not self.body.echo:
                return []
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = self.logprobs(self.prompt_entries(choice), self.echo(choice)[1])
            # finish_reason is set already where nothing is generated (max_tokens 0)
            delta = {"text": self.prompt_text(choice), "logprobs": logprobs, "finish_reason": choice.finish_reason}
            return [{"index": choice.index, **delta}]
        if not (event.text or event.finish_reason or self.body.logprobs is not None):
            return []
        logprobs = None
        if self.body.logprobs is not None:  # the offset in the text streamed so far, echo included
            done = len(self.prompt_text(choice)) if self.body.echo else 0
            offset = done + sum(len(t.text) for t in choice.tokens[:-1])
            logprobs = self.logprobs([(event.token_id, event.logprob, event.top_logprobs)], [offset])
        return [{"index": choice.index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}]


class ChatReply(_Reply):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def token_logprob(self, token_id: int, logprob: float, top: list) -> dict:
        def entry(i: int, lp: float) -> dict:
            text = self.token_text(i)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**entry(token_id, logprob), "top_logprobs": [entry(i, lp) for i, lp in top]}

    def logprobs(self, tokens: list[Token]) -> dict | None:
        if not self.body.logprobs:
            return None
        return {"content": [self.token_logprob(t.token_id, t.logprob, t.top_logprobs) for t in tokens], "refusal": None}

    def __init__(self, server: Server, body, choices: list[Choice], tools: tuple[str, list[dict]] = ("none", [])):
        super().__init__(server, body, choices)
        self.tool_mode, self.callable_tools = tools
        self.parallel = body.parallel_tool_calls is not False
        self.shown: dict[int, int] = {}  # per choice: characters of its text sent as content so far

    def message(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, finish_reason) of a finished reply: its calls read, where tools were offered."""
        if self.tool_mode == "none" or finish_reason != "stop":
            return text, [], finish_reason
        content, calls = parse_calls(text, self.callable_tools, self.parallel)
        return (content, calls, "tool_calls") if calls else (text, [], finish_reason)

    def choice(self, c: Choice) -> dict:
        content, calls, finish_reason = self.message(c.text, c.finish_reason)
        return {
            "index": c.index,
            "message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls},
            "logprobs": self.logprobs(c.tokens),
            "finish_reason": finish_reason,
        }

    def deltas(self, choice: Choice, event: Event) -> list[dict]:
        if isinstance(event, Started):
            return [
                {
                    "index": choice.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        if self.tool_mode != "none":
            return self.tool_deltas(choice, event)
        out = []
        if event.text or self.body.logprobs:
            logprobs = self.logprobs([event])
            out.append(
                {"index": choice.index, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}
            )
        if event.finish_reason:
            out.append({"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason})
        return out

    def tool_deltas(self, choice: Choice, event: Token) -> list[dict]:
        """Content as it comes, up to where a call may begin; at the end, each call as one
        `delta.tool_calls` chunk (name and whole arguments), then finish_reason "tool_calls"."""
        text, shown = choice.text, self.shown.get(choice.index, 0)
        if event.finish_reason is None:
            upto = open_prefix(text)
        else:
            content, calls, finish_reason = self.message(text, event.finish_reason)
            upto = open_prefix(text) if calls else len(text)
        out = []
        if upto > shown:
            self.shown[choice.index] = upto
            delta = {"content": text[shown:upto]}
            out.append({"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": None})
        if event.finish_reason is None:
            return out
        for i, call in enumerate(calls):
            delta = {"tool_calls": [{"index": i, **call}]}
            out.append({"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": None})
        out.append({"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
        return out


def prometheus_text(engine: Engine) -> str:
    """The engine's counters in Prometheus' text exposition format."""
    m = engine.metrics
    cache = engine.prefix_cache
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP kvgen_{name} {help}", f"# TYPE kvgen_{name} {kind}"])
        lines.extend(f"kvgen_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "Requests that left the engine, by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in m.requests.items()])  # fmt: skip
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", m.prompt_tokens)])
    metric(
        "cached_prompt_tokens_total", "counter", "Prompt tokens reused from the prefix cache.", [("", m.cached_tokens)]
    )
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generated_tokens)])
    metric("queue_depth", "gauge", "Requests waiting for a batch row.", [("", len(engine.waiting))])
    metric("running_requests", "gauge", "Requests holding a batch row.", [("", engine.running)])
    metric("batch_size", "gauge", "Rows decoded together in the last decode step.", [("", m.batch_size)])
    metric("batch_size_max", "gauge", "Most rows ever decoded together in one step.", [("", m.max_batch_size)])
    metric("decode_steps_total", "counter", "Decode steps (one forward for the whole batch).", [("", m.decode_steps)])
    metric(
        "decode_rows_total",
        "counter",
        "Rows over all decode steps (divide by steps: mean batch).",
        [("", m.batch_rows)],
    )
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [("", round(m.tokens_per_second(), 3))])  # fmt: skip
    if cache is not None:
        metric("prefix_cache_bytes", "gauge", "Bytes of KV held by the prefix cache.", [("", cache.nbytes)])
        metric("prefix_cache_entries", "gauge", "Token streams held by the prefix cache.", [("", len(cache))])
    return "\n".join(lines) + "\n"
