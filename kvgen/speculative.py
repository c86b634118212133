"""Prompt-lookup speculative decoding: draft tokens copied from the context, verified in one forward.

When the continuation repeats text already in the context (editing a passage, quoting code,
answering from a document), the tokens after the latest earlier occurrence of the last few tokens
are a good guess at what comes next. Each step feeds [last accepted token + up to `draft_tokens`
guesses] in ONE forward and keeps the longest prefix of guesses equal to the model's own argmax,
plus the model's next token after that prefix: one to `draft_tokens + 1` tokens per forward, and
exactly the tokens plain greedy decoding would choose. Rejected guesses are cut from the KV cache
with `cache.truncate`.

Sliding-window layers drop what no later query can see, so a cut could need a dropped entry.
Their caches here keep `draft_tokens` entries of slack beyond the window (the attention mask still
limits each query to the window), which is always enough to cut back the rejected guesses.

`generate_tokens_prompt_lookup` is a token source like `generate.generate_tokens`: it yields one
(1,) tensor per token, so stop strings, EOS, `max_new_tokens` and closing the stream work above it
unchanged; tokens accepted in one forward are yielded one after another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cache import DynamicLayerCache, LayerCache, LayerShape, RingLayerCache, StaticLayerCache, truncate
from .generate import check_fits, prefill
from .sampling import SamplingParams

SPECULATIVE_METHODS = ("prompt_lookup",)


@dataclass
class SpeculativeStats:
    """Counts over the verification forwards run so far (a row that stops early may leave accepted
    tokens unused)."""

    drafted: int = 0  # guesses fed to the model
    accepted: int = 0  # guesses equal to the model's own choice
    verify_steps: int = 0  # decode forwards, with or without guesses

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens gained per decode forward: 1 for plain decoding, up to draft_tokens + 1."""
        return (self.verify_steps + self.accepted) / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            **dataclasses.asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_step": self.tokens_per_step,
        }


def check_speculative(
    method: str, params: SamplingParams, batch: int, backend: str = "native", draft_tokens: int = 4, ngram_size: int = 3
) -> None:
    """Raise ValueError for a combination speculative decoding does not support."""
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"unknown speculative method {method!r}; choose one of: {', '.join(SPECULATIVE_METHODS)}")
    if backend != "native":
        raise ValueError(f"speculative decoding needs the native backend; this model was loaded with {backend!r}")
    if batch != 1:
        raise ValueError(f"speculative decoding runs one prompt at a time, got {batch}")
    if not params.greedy or params.repetition_penalty != 1.0:
        # Acceptance compares guesses with the argmax; sampling would need rejection sampling to stay exact.
        raise ValueError("speculative decoding is greedy only: use temperature=0 and repetition_penalty=1")
    if draft_tokens < 1 or ngram_size < 1:
        raise ValueError(f"draft_tokens and ngram_size must be at least 1, got {draft_tokens} and {ngram_size}")


def find_draft(context: list[int], draft_tokens: int, ngram_size: int = 3, min_ngram: int = 2) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the context's last n tokens.

    Tries n = `ngram_size` down to `min_ngram` and returns up to `draft_tokens` tokens; [] if
    nothing matches. Single-token matches (min_ngram=1) draft often but are mostly rejected: on
    free text with Gemma 3 270M they made decoding slower, 2-token matches about break even.
    """
    for n in range(min(ngram_size, len(context) - 1), min_ngram - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):  # latest first; never the tail itself
            if context[start : start + n] == tail:
                return context[start + n : start + n + draft_tokens]
    return []


class _SlackDynamicCache(DynamicLayerCache):
    """A sliding-window dynamic cache that keeps `slack` entries more than its window needs."""

    def __init__(self, window: int, slack: int, group_size: int) -> None:
        super().__init__(window + slack, group_size)
        self.attended = window  # what the model's mask lets a query see

    def truncate(self, keep: int) -> bool:
        first = self.seen - self.length  # the stream index of the oldest token held
        if keep > self.seen or max(keep - (self.attended - 1), 0) < min(first, keep):
            return False
        self.keep(0, max(keep - first, 0))
        self.seen = keep
        return True


class _SlackRingCache(RingLayerCache):
    """A ring cache of `window + slack` slots for a layer that attends to `window` tokens."""

    def __init__(self, shape: LayerShape, slack: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(1, dataclasses.replace(shape, window=shape.window + slack), max_len, dtype, device)
        self.attended = shape.window

    def truncate(self, keep: int) -> bool:
        size = self.keys.shape[2]
        if keep > self.index or max(keep - (self.attended - 1), 0) < min(self.index - size, keep):
            return False
        forgotten = torch.arange(max(keep, self.index - size), self.index, device=self.positions.device) % size
        self.positions[:, forgotten] = -1
        self.index = keep
        return True


def make_slack_cache(
    kind: str, layers: list[LayerShape], max_len: int, slack: int, dtype: torch.dtype, device: torch.device
) -> list[LayerCache]:
    """`cache.make_cache(kind, layers, 1, ...)`, with `slack` spare entries in sliding-window layers."""
    if kind == "dynamic":
        return [
            DynamicLayerCache(None, s.group_size)
            if s.window is None
            else _SlackDynamicCache(s.window, slack, s.group_size)
            for s in layers
        ]
    if kind == "static":
        return [
            StaticLayerCache(1, s, max_len, dtype, device)
            if s.window is None
            else _SlackRingCache(s, slack, max_len, dtype, device)
            for s in layers
        ]
    raise ValueError(f"speculative decoding supports the dynamic and static caches, not {kind!r}")


@torch.inference_mode()
def generate_tokens_prompt_lookup(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    cache_kind: str = "dynamic",
    draft_tokens: int = 4,
    ngram_size: int = 3,
    stats: SpeculativeStats | None = None,
) -> Iterator[Tensor]:
    """Yield (1,) greedy token ids, `max_new_tokens` times, the same as `generate_tokens` would.

    Each decode forward verifies up to `draft_tokens` guesses found by `find_draft` (n-grams of
    `ngram_size` down to 2, or 1 if `ngram_size` is 1); `stats`, if given, is updated after every
    forward. The tokens are those of plain greedy decoding, as far as floating point allows: the
    verification forward covers several positions at once, like a prefill, so in bfloat16 two
    logits that (nearly) tie may come out in the other order than in a one-token decode step.
    """
    check_speculative("prompt_lookup", params, 1, draft_tokens=draft_tokens, ngram_size=ngram_size)
    stats = SpeculativeStats() if stats is None else stats
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    check_fits(len(prompt), max_new_tokens, model.config.context_length)
    cache = make_slack_cache(
        cache_kind, model.cache_layout(), len(prompt) + max_new_tokens, draft_tokens, dtype, device
    )
    tokens = torch.tensor([prompt], device=device)
    logits = prefill(model, tokens, torch.arange(len(prompt), device=device)[None], cache)  # (1, vocab)
    token = int(logits[0].argmax())
    context = list(prompt)  # every token so far; the cache holds all but the last
    yield torch.tensor([token], device=device)
    produced = 1
    while produced < max_new_tokens:
        context.append(token)
        # The forward yields accepted + 1 tokens: never more than are still wanted.
        draft = find_draft(context, min(draft_tokens, max_new_tokens - produced - 1), ngram_size, min(ngram_size, 2))
        fed = torch.tensor([[token, *draft]], device=device)  # (1, 1 + d)
        held = len(context) - 1
        positions = torch.arange(held, held + fed.shape[1], device=device)[None]
        choices = model(fed, positions, cache, all_logits=True)[0].argmax(dim=-1).tolist()  # (1 + d,)
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted]:
            accepted += 1
        if accepted < len(draft) and not truncate(cache, held + 1 + accepted):
            raise RuntimeError("a KV cache could not be cut back to the accepted tokens")  # slack prevents this
        stats.drafted += len(draft)
        stats.accepted += accepted
        stats.verify_steps += 1
        new = draft[:accepted] + [choices[accepted]]
        context.extend(new[:-1])
        token = new[-1]
        for t in new:
            yield torch.tensor([t], device=device)
            produced += 1
