"""Sampling parameters and pure functions over logits.

Each function takes (B, vocab) logits and returns new ones; `sample` chains them in transformers'
order (repetition penalty, temperature, top-k, top-p, min-p) and draws with an explicit
`torch.Generator`, so the same seed gives the same tokens. Temperature 0 is argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# A temperature below this samples as 0 does (vLLM's threshold too): the draw is the argmax all but
# surely, and dividing logits by a temperature near 0 overflows float32 (NaN probabilities).
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be a whole number >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The random generator for one generation: seeded if a seed is given, else from entropy."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on every token in `history` (B, L): positive logits divided, negative multiplied.
    A penalty near 0 divides past float32's range: such logits are held at its largest value."""
    seen = logits.gather(-1, history)
    penalised = torch.where(seen <= 0, seen * penalty, seen / penalty)  # 0 * penalty, never 0 / 0
    return logits.scatter(-1, history, penalised.clamp(max=torch.finfo(logits.dtype).max))


def top_k(logits: Tensor, k: int) -> Tensor:
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p(logits: Tensor, p: float) -> Tensor:
    """Drop tokens less likely than `p` times the most likely one."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def argmax(logits: Tensor) -> Tensor:
    """(B, vocab) -> (B,) the index of each row's largest logit, the first of equal ones: what
    `Tensor.argmax` gives. torch's CPU argmax walks the row one element at a time, a maximum per
    chunk is vectorized: so the first chunk that holds the row's maximum is found first, then the
    first maximum in it (figures in docs/speed.md)."""
    B, V = logits.shape
    chunk = next((c for c in (1024, 512, 256, 128, 64) if V % c == 0), None)
    if logits.device.type != "cpu" or chunk is None or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    chunks = logits.view(B, V // chunk, chunk)
    first = chunks.amax(dim=-1).argmax(dim=-1)  # (B,) the first chunk holding each row's maximum
    return first * chunk + chunks[torch.arange(B), first].argmax(dim=-1)


def sample(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None, history: Tensor | None = None
) -> Tensor:
    """(B, vocab) logits -> (B,) next token ids. `history` (B, L) is needed for the repetition penalty."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        logits = repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy or params.temperature < MIN_TEMPERATURE:
        return argmax(logits)
    logits = (logits / params.temperature).clamp(max=torch.finfo(logits.dtype).max)  # a penalised logit's inf
    if params.top_k:
        logits = top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p(logits, params.top_p)
    if params.min_p:
        logits = min_p(logits, params.min_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def presence_frequency_penalty(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: subtract `frequency` per earlier occurrence of a token and `presence` once
    if it occurred at all. `counts` (B, vocab) counts each token among the generated ones."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sample_rows(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[Tensor | None],
) -> Tensor:
    """(B, vocab) logits -> (B,) token ids, each row with its own parameters, generator and (1, L) history.

    A row's token is exactly what `sample` gives that row alone; a batch that is all plain greedy
    takes one argmax.
    """
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return argmax(logits.float())
    return torch.cat(
        [sample(logits[i : i + 1], p, g, h) for i, (p, g, h) in enumerate(zip(params, generators, histories))]
    )
