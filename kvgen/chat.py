"""Chat: the model's own chat template, and sessions that keep the KV cache between turns.

A session renders the whole conversation with the template each turn, finds how much of it the
cache already holds (the longest common prefix of token ids), cuts the cache back to that, and
prefills only the rest. Re-rendering rather than appending keeps the result identical to a fresh
run over the whole conversation, even where the template or the tokenizer would spell the previous
reply differently from the tokens that were generated.
"""

from __future__ import annotations

from typing import Iterator

from .api import LM, Response
from .cache import make_cache, truncate

# For models whose tokenizer carries no chat template (base models, such as the default Gemma 3
# 270M GGUF): a plain transcript that any language model can continue, tokenized as the model's
# tokenizer tokenizes text (so with its BOS), and that stops when the model starts the user's next line.
PLAIN_STOPS = ["\nUser:"]


def chat_template(lm: LM, override: str | None = None) -> tuple[str | None, list[str]]:
    """(template, extra stop strings): the given one, else the model's, else (None) the plain transcript."""
    if override:
        return override, []
    if getattr(lm.tokenizer, "chat_template", None):
        return lm.tokenizer.chat_template, []
    return None, PLAIN_STOPS


def plain_transcript(messages: list[dict]) -> str:
    """`User: ...` / `Assistant: ...` lines ending with the prompt for the reply, `Assistant:`.

    A reply is written back exactly as it was generated after `Assistant:` (its own leading space
    included, none added), so that a session's next turn finds every token of it in its cache.
    """
    parts = []
    for m in messages:
        content = m["content"] or ""
        if m["role"] == "system":
            parts.append(f"{content}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"Assistant:{content}\n")
        else:
            parts.append(f"{m['role'].capitalize()}: {content}\n")
    return "".join(parts) + "Assistant:"


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("no messages given")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"a message needs 'role' and 'content': {m!r}")


def render(lm: LM, messages: list[dict], template: str | None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation, ending with the prompt for the assistant's reply: the template's
    text tokenized as transformers' `apply_chat_template` does, or (template None) the plain transcript
    tokenized as any prompt is (BOS added the model's way). `tools` go to the template."""
    check_messages(messages)
    if template is None:
        if tools:
            raise ValueError("this model has no chat template, so it cannot be given tools")
        return lm.encode(plain_transcript(messages))
    extra = {"tools": tools} if tools else {}
    encoded = lm.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, **extra)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation whose KV cache lives from turn to turn (native backend).

    `send` streams the reply to one user message; `last_prefill_tokens` says how many tokens that
    turn had to prefill. `reset` forgets the conversation (keeping the system prompt).
    """

    def __init__(
        self,
        lm: LM,
        system: str | None = None,
        cache: str = "dynamic",
        template: str | None = None,
        max_len: int = 4096,
        sink_tokens: int = 4,
        window: int | None = None,
    ) -> None:
        self.lm = lm
        self.system = system
        self.cache_kind = cache
        self.max_len = max_len  # slots of a static cache
        # The sink kind runs past the context; generate() must know the kind to skip the context check.
        self.sink = dict(cache="sink", sink_tokens=sink_tokens, window=window) if cache == "sink" else {}
        self.template, self.stops = chat_template(lm, template)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.kv_cache = None
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds
        self.last_prefill_tokens = 0

    def _reuse(self, ids: list[int]) -> int:
        """Cut the cache back to what it shares with `ids`; returns how many tokens it still holds."""
        if self.lm.backend != "native":
            return 0  # transformers' generate() starts from scratch each turn
        keep = min(common_prefix(self.cached_ids, ids), len(ids) - 1)  # prefill at least one token
        if self.kv_cache is None or not truncate(self.kv_cache, keep):
            layout = self.lm.model.cache_layout()
            if self.sink:  # the window defaults to the context less the sinks, as in `generate_tokens`
                context = self.lm.model.config.context_length
                window = self.sink["window"] or context - self.sink["sink_tokens"]
                sink = dict(sink_tokens=self.sink["sink_tokens"], window=window)
                self.kv_cache = make_cache("sink", layout, 1, context, self.lm.dtype, self.lm.device, **sink)
            else:
                self.kv_cache = make_cache(self.cache_kind, layout, 1, self.max_len, self.lm.dtype, self.lm.device)
            keep = 0
        return keep

    def send(
        self, user: str, max_new_tokens: int = 256, stop: list[str] | None = None, **sampling
    ) -> Iterator[Response]:
        """Stream the reply to `user`. Closing the stream early keeps the partial reply."""
        if not user:
            raise ValueError("message is empty")
        ids = render(self.lm, self.messages + [{"role": "user", "content": user}], self.template)
        keep = self._reuse(ids)
        self.messages.append({"role": "user", "content": user})
        self.last_prefill_tokens = len(ids) - keep
        reply, generated = [], []
        try:
            for response in self.lm.stream_responses(
                ids[keep:],
                max_new_tokens,
                stop=list(stop or []) + self.stops,
                kv_cache=self.kv_cache,
                cached_tokens=keep,
                **self.sink,
                **sampling,
            ):
                reply.append(response.text)
                generated.append(response.token_id)
                yield response
        finally:
            # The cache took in every generated token but the last, which was never fed back. With
            # no token at all, how far prefill got is unknown: start the next turn afresh.
            self.cached_ids = ids + generated[:-1] if generated else []
            if not generated:
                self.kv_cache = None
            self.messages.append({"role": "assistant", "content": "".join(reply)})
