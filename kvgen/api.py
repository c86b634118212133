"""The Python API: `LM.generate`, `LM.stream`, `LM.generate_batch`, for both backends.

Layers, bottom to top: a token source yields (B,) token ids per step (`generate.generate_tokens`
for the native loop, `hf.generate_tokens_hf` for transformers); `LM.stream_responses` turns them
into text pieces per row with stop handling and timings; `stream` and `generate` sit on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .cache import CACHE_KINDS, LayerCache
from .generate import Step, generate_tokens
from .grammar import Constraint, constraints, grammar_for, mask_logits
from .hf import generate_tokens_hf
from .runner import Runner
from .sampling import SamplingParams
from .speculative import SpeculativeStats, check_speculative, generate_tokens_prompt_lookup
from .text import IncrementalDecoder, StopMatcher

BACKENDS = ("native", "hf")


@dataclass
class Timings:
    load_s: float = 0.0
    prefill_s: float = 0.0  # prompt in, first token out
    decode_s: float = 0.0  # first token to last token
    prompt_tokens: int = 0
    new_tokens: int = 0
    speculative: SpeculativeStats | None = None  # drafted / accepted / verify_steps, with speculative=...

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second: every token after the first comes from one decode step."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {**dataclasses.asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}
        if self.speculative is None:
            del out["speculative"]
        else:
            out["speculative"] = self.speculative.as_dict()
        return out


@dataclass
class Response:
    """One step of one row: the text it adds (may be empty) and, on its last step, why it ended."""

    text: str
    token_id: int
    finish_reason: str | None = None  # "length", "eos" or "stop" on the row's last step
    timings: Timings | None = None  # on the row's last step
    kept: int | None = None  # after a stop string: how many of the row's tokens `Result.token_ids` keeps


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)
    trace: list | None = None  # `kvgen.trace.StepRecord`s, one per step, with generate(..., trace=True)
    tool_calls: list[dict] | None = None  # OpenAI's tool_calls, from chat(..., tools=...)

    @classmethod
    def collect(cls, prompt_ids: list[int], responses: list[Response]) -> Result:
        """A finished row's Result from all its responses (the last one carries why it ended)."""
        last = responses[-1]
        tokens = [r.token_id for r in responses][: last.kept]
        return cls("".join(r.text for r in responses), tokens, list(prompt_ids), last.finish_reason, last.timings)

    def as_dict(self) -> dict:
        out = {**dataclasses.asdict(self), "timings": self.timings.as_dict()}
        for key in ("trace", "tool_calls"):
            if out[key] is None:
                del out[key]
        return out


class _Row:
    """One prompt's progress: its tokens, its text so far, and whether it has finished."""

    def __init__(self, lm: "LM", prompt_ids: list[int], stop: list[str], stop_at_eos: bool) -> None:
        self.decoder = IncrementalDecoder(lm.tokenizer, prompt_ids)
        self.stops = StopMatcher(stop)
        self.eos = set(lm.eos_token_ids) if stop_at_eos else set()
        self.finish_reason: str | None = None
        self.returned: list[str] = []  # the text pieces handed out so far

    def add(self, token_id: int, last_step: bool) -> Response:
        is_eos = token_id in self.eos
        piece = "" if is_eos else self.decoder.add(token_id)
        if is_eos or last_step:
            piece += self.decoder.flush()  # the row ends: even a split character is shown
        text, stopped = self.stops.feed(piece)
        kept = None
        if stopped:
            self.finish_reason = "stop"
            kept = self._spelling("".join(self.returned) + text)
        elif is_eos or last_step:
            self.finish_reason = "eos" if is_eos else "length"
            text += self.stops.flush()
        self.returned.append(text)
        return Response(text, token_id, self.finish_reason, kept=kept)

    def _spelling(self, text: str) -> int:
        """The fewest of the tokens so far whose decoding begins with `text` (a stop string ended it)."""
        n = self.decoder.generated
        while n and self.decoder.text_of(n - 1).startswith(text):  # a stop string is a few tokens long
            n -= 1
        return n


class LM:
    """A loaded model and its tokenizer. Build one with `kvgen.load`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        backend: str,
        path: Path,
        eos_token_ids: list[int],
        load_seconds: float = 0.0,
        runner: Runner | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.path = path
        self.eos_token_ids = eos_token_ids
        self.load_seconds = load_seconds
        self.runner = runner or Runner()  # how the native loop's decode steps run (`kvgen.runner`)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (special tokens such as BOS added the model's way); ids pass through."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise ValueError("prompt is empty")
        return list(prompt)

    def _token_steps(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams,
        cache: str,
        stop_at_eos: bool,
        kv_cache: list[LayerCache] | None,
        cached_tokens: int,
        observe: Callable[[Step], None] | None,
        speculative: str | None = None,
        draft_tokens: int = 4,
        ngram_size: int = 3,
        stats: SpeculativeStats | None = None,
        sink_tokens: int = 4,
        window: int | None = None,
        logits_mask: Callable[[Tensor], Tensor] | None = None,
    ) -> Iterator[Tensor]:
        if cache not in CACHE_KINDS:
            raise ValueError(f"unknown cache kind {cache!r}; choose one of: {', '.join(CACHE_KINDS)}")
        if (kv_cache is not None or observe is not None) and self.backend != "native":
            raise ValueError("continuing a KV cache or observing the steps needs the native backend")
        if cache == "sink" and (self.backend != "native" or speculative is not None):
            raise ValueError("the sink cache needs the native backend and plain (not speculative) decoding")
        if logits_mask is not None and (self.backend != "native" or speculative is not None):
            raise ValueError("json_schema and grammar need the native backend and plain (not speculative) decoding")
        if speculative is not None:
            check_speculative(speculative, params, len(prompts), self.backend, draft_tokens, ngram_size)
            if kv_cache is not None or observe is not None:
                raise ValueError("speculative decoding cannot continue a KV cache or be traced")
            return generate_tokens_prompt_lookup(
                self.model, prompts[0], max_new_tokens, params, cache, draft_tokens, ngram_size, stats
            )
        if self.backend == "hf":
            pad = (
                self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None
                else (self.eos_token_ids or [0])[0]
            )
            eos = self.eos_token_ids if stop_at_eos else []
            return generate_tokens_hf(self.model, prompts, max_new_tokens, params, eos, pad, cache)
        return generate_tokens(
            self.model,
            prompts,
            max_new_tokens,
            params,
            cache,
            kv_cache,
            cached_tokens,
            observe,
            sink_tokens,
            window,
            decoder=self.runner.decoder,
            logits_mask=logits_mask,
        )

    def constraints(self, rows: int, json_schema: Any = None, grammar: str | None = None) -> list[Constraint] | None:
        """One grammar state per row for `json_schema` or `grammar` (None for neither); ValueError
        naming what the grammar library cannot enforce."""
        spec = grammar_for(json_schema, grammar)
        return None if spec is None else constraints(self, spec, rows)

    def stream_batch(
        self,
        prompts: list[str | list[int]],
        max_new_tokens: int = 64,
        *,
        stop: str | list[str] | None = None,
        stop_at_eos: bool = True,
        cache: str = "dynamic",
        kv_cache: list[LayerCache] | None = None,
        cached_tokens: int = 0,
        observe: Callable[[Step], None] | None = None,
        speculative: str | None = None,
        draft_tokens: int = 4,
        ngram_size: int = 3,
        sink_tokens: int = 4,
        window: int | None = None,
        json_schema: Any = None,
        grammar: str | None = None,
        **sampling,
    ) -> Iterator[list[Response | None]]:
        """Yield, per step, one `Response` per prompt (None once that prompt has finished).

        `kv_cache` continues a cache that already holds `cached_tokens` tokens before the prompts
        (a chat session's earlier turns); `observe` receives every `generate.Step` (tracing). Both
        need the native backend. `speculative="prompt_lookup"` (native backend, one greedy prompt)
        verifies up to `draft_tokens` tokens copied from the context per forward, found by matching
        its last `ngram_size` (down to 2) tokens (`kvgen.speculative`); the tokens are the same, and
        the final `Timings.speculative` counts drafted and accepted tokens. `cache="sink"` keeps the
        first `sink_tokens` and the last `window` tokens (default: the context less the sinks) and
        runs past the model's context (`kvgen.cache.SinkLayerCache`). `json_schema` (a
        JSON schema) or `grammar` (Lark text, llguidance's dialect) constrains every row's tokens to
        documents of that grammar, ended by EOS only where complete (`kvgen.grammar`).
        """
        if not prompts:
            raise ValueError("no prompts given")
        params = SamplingParams(**sampling)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_ids = [self.encode(p) for p in prompts]
        if (json_schema is not None or grammar is not None) and not stop_at_eos:
            raise ValueError("json_schema and grammar end a document with EOS: they cannot ignore it")
        rules = self.constraints(len(prompts), json_schema, grammar)
        logits_mask = None if rules is None else lambda logits: mask_logits(logits, rules)
        rows = [_Row(self, ids, stop, stop_at_eos) for ids in prompt_ids]
        stats = SpeculativeStats() if speculative is not None else None
        start = time.perf_counter()
        first_token_at = start
        with contextlib.closing(
            self._token_steps(
                prompt_ids,
                max_new_tokens,
                params,
                cache,
                stop_at_eos,
                kv_cache,
                cached_tokens,
                observe,
                speculative,
                draft_tokens,
                ngram_size,
                stats,
                sink_tokens=sink_tokens,
                window=window,
                logits_mask=logits_mask,
            )
        ) as steps:
            for step, tokens in enumerate(steps):
                now = time.perf_counter()
                if step == 0:
                    first_token_at = now
                out: list[Response | None] = []
                for i, (row, ids, token) in enumerate(zip(rows, prompt_ids, tokens.tolist())):
                    if row.finish_reason is not None:
                        out.append(None)
                        continue
                    if rules is not None:
                        rules[i].advance(token)
                    response = row.add(token, last_step=step + 1 == max_new_tokens)
                    if response.finish_reason and rules is not None:
                        rules[i].done = True
                    if response.finish_reason:
                        response.timings = Timings(
                            self.load_seconds, first_token_at - start, now - first_token_at, len(ids), step + 1
                        )
                        if stats is not None:
                            response.timings.speculative = dataclasses.replace(stats)
                    out.append(response)
                yield out
                if all(row.finish_reason for row in rows):
                    return

    def stream_responses(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> Iterator[Response]:
        """Yield one `Response` per generated token of a single prompt."""
        for (response,) in self.stream_batch([prompt], max_new_tokens, **kwargs):
            yield response

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are decoded; closing the generator stops generation at once.

        Keyword arguments are those of `generate`.
        """
        with contextlib.closing(self.stream_responses(prompt, max_new_tokens, **kwargs)) as responses:
            for response in responses:
                if response.text:
                    yield response.text

    def generate_batch(self, prompts: list[str | list[int]], max_new_tokens: int = 64, **kwargs) -> list[Result]:
        """Generate for several prompts at once (left padding, per-row positions).

        Each row's greedy output is the same as running that prompt alone.
        """
        prompt_ids = [self.encode(p) for p in prompts]
        responses: list[list[Response]] = [[] for _ in prompts]
        results: list[Result | None] = [None] * len(prompts)
        for step in self.stream_batch(prompt_ids, max_new_tokens, **kwargs):
            for i, response in enumerate(step):
                if response is None:
                    continue
                responses[i].append(response)
                if response.finish_reason:
                    results[i] = Result.collect(prompt_ids[i], responses[i])
        return results

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        template: str | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        **kwargs,
    ) -> Result:
        """Reply to a conversation, [{"role": "user", "content": ...}, ...], rendered with the
        model's chat template (or `template`, a Jinja string). Keyword arguments are `generate`'s,
        `json_schema` and `grammar` included.

        `tools` (OpenAI's list of functions) are rendered by the template; calls the reply makes come
        back as `Result.tool_calls` (OpenAI's form) with finish_reason "tool_calls". `tool_choice`
        "auto" (default with tools), "none", "required" or {"type": "function", "function": {"name":
        ...}}; the last two constrain the reply to calls whose arguments follow the schema.
        """
        from .chat import chat_template, render
        from .tools import call_grammar, choose, parse_calls, supports_tools, template_messages

        template, stops = chat_template(self, template)
        mode, callable_tools = choose(tools, tool_choice)
        if mode != "none" and not supports_tools(template):
            raise ValueError("this model's chat template has no tool support (no tools, or no <tool_call> syntax)")
        if mode == "required":
            if kwargs.get("json_schema") is not None or kwargs.get("grammar") is not None:
                raise ValueError("a required tool call and json_schema/grammar cannot both constrain the reply")
            kwargs["grammar"] = call_grammar(callable_tools, self.tokenizer, parallel_tool_calls)
        stop = kwargs.pop("stop", None)
        stop = ([stop] if isinstance(stop, str) else list(stop or [])) + stops
        ids = render(self, template_messages(messages), template, tools if mode != "none" else None)
        result = self.generate(ids, max_new_tokens, stop=stop, **kwargs)
        if mode != "none":
            content, calls = parse_calls(result.text, callable_tools, parallel_tool_calls)
            if calls and result.finish_reason != "length":
                result.text, result.tool_calls, result.finish_reason = content or "", calls, "tool_calls"
        return result

    def chat_session(
        self,
        system: str | None = None,
        cache: str = "dynamic",
        template: str | None = None,
        sink_tokens: int = 4,
        window: int | None = None,
    ):
        """A `ChatSession` that keeps the KV cache between turns, so each turn prefills only its new tokens."""
        from .chat import ChatSession

        return ChatSession(self, system, cache, template, sink_tokens=sink_tokens, window=window)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stop_at_eos: bool = True,
        cache: str = "dynamic",
        trace: bool = False,
        speculative: str | None = None,
        draft_tokens: int = 4,
        ngram_size: int = 3,
        sink_tokens: int = 4,
        window: int | None = None,
        json_schema: Any = None,
        grammar: str | None = None,
    ) -> Result:
        """Generate up to `max_new_tokens` tokens after `prompt`.

        Temperature 0 is greedy. Generation ends after exactly `max_new_tokens` tokens
        (finish_reason "length") unless an EOS token ("eos", when `stop_at_eos`) or one of the `stop`
        strings ("stop"; the stop string is not returned) ends it first. `cache` is "dynamic",
        "static" or "sink": StreamingLLM's attention sinks, `sink_tokens` first tokens plus the last
        `window` (default: the context less the sinks), for text of any length on a rotary model.

        `token_ids` are every generated token, EOS included, unless a stop string ended the run:
        then they are the fewest generated tokens whose decoding begins with `text`, so the tokens
        that only spelled the stop string are dropped, and decoding them gives `text` plus, where
        the stop string began inside the last one, the rest of that token (vLLM keeps the stop
        string's tokens; kvgen keeps `token_ids` in step with `text`). `timings.new_tokens` counts
        every token generated. `trace=True` (native backend) also records every step's shapes and
        caches in `Result.trace` (`kvgen.trace`).
        `speculative="prompt_lookup"` (greedy, native backend) drafts up to `draft_tokens` tokens
        per forward from earlier text matching the last `ngram_size` tokens, with the same result;
        `timings.speculative` holds its counts. `json_schema` (a dict, or its JSON text) makes the text a JSON
        document valid against it; `grammar` (Lark text, llguidance's dialect) any grammar's
        document; a feature the grammar library cannot enforce is a ValueError naming it.
        """
        tracer = None
        if trace:
            if self.backend != "native":
                raise ValueError(
                    f"trace=True needs the native backend; this model was loaded with backend={self.backend!r}"
                )
            from .trace import Tracer

            tracer = Tracer(self.tokenizer, layout=self.model.cache_layout())
        (result,) = self.generate_batch(
            [prompt],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            stop_at_eos=stop_at_eos,
            cache=cache,
            observe=tracer,
            speculative=speculative,
            draft_tokens=draft_tokens,
            ngram_size=ngram_size,
            sink_tokens=sink_tokens,
            window=window,
            json_schema=json_schema,
            grammar=grammar,
        )
        if tracer is not None:
            result.trace = tracer.records
        return result
