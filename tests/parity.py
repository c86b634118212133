"""Checks that kvgen agrees with transformers on the same checkpoint folder.

Every model family's tests call `check_parity`: greedy tokens equal to transformers' `generate()`
with each cache kind and in a batch, and last-position logits equal to transformers' forward at
prefill and at every decode step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

import kvgen
from kvgen.cache import make_cache
from kvgen.generate import decode_one, prefill

PROMPTS = [
    "It was the best of times, it was the worst of times",
    "Call me Ishmael.",
    "Alice was beginning to get very tired of sitting by her sister on the bank",
]


@lru_cache(maxsize=8)
def hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(folder: str | Path, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy `generate()`, run through EOS."""
    model = hf_model(str(folder))
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
    )
    return out[0, len(prompt_ids) :].tolist()


def assert_meaningful(
    folder: str | Path, prompt_ids: list[list[int]], outputs: list[list[int]], min_gap: float = 1e-3
) -> None:
    """A parity test proves little if the output is one repeated token or the top-2 logits nearly tie."""
    distinct = len({t for tokens in outputs for t in tokens})
    assert distinct >= 12, f"random model output barely varies ({distinct} distinct tokens): {outputs}"
    for ids, tokens in zip(prompt_ids, outputs):
        with torch.no_grad():
            logits = hf_model(str(folder))(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
        top2 = logits.topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).min().item()
        assert gap > min_gap, f"top-2 logits {gap:.1e} apart: too close for a meaningful greedy comparison"


def assert_logits_match(
    folder: str | Path, prompt_ids: list[int], tokens: list[int], cache_kind: str, atol: float = 1e-4
) -> None:
    """Our last-position logits at prefill and every decode step vs transformers' full forward."""
    lm = kvgen.load(folder, dtype="float32")
    model, ref = lm.model, hf_model(str(folder))
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        expected = ref(ids).logits[0, len(prompt_ids) - 1 :]  # (n + 1, vocab)
    T = len(prompt_ids)
    cache = make_cache(cache_kind, model.cache_layout(), 1, T + len(tokens), torch.float32)
    got = [prefill(model, ids[:, :T], torch.arange(T)[None], cache)[0]]
    for i, token in enumerate(tokens):
        got.append(decode_one(model, torch.tensor([token]), torch.tensor([T + i]), cache)[0])
    diff = (torch.stack(got) - expected).abs().max().item()
    assert diff < atol, f"logits differ from transformers by {diff:.2e} ({cache_kind} cache)"


def check_parity(folder: str | Path, n: int = 48, prompts: list[str] = PROMPTS) -> None:
    """Greedy tokens equal to transformers' for `n` tokens (each cache kind, alone and batched),
    and logits within 1e-4 at every step."""
    lm = kvgen.load(folder, dtype="float32")
    prompt_ids = [lm.encode(p) for p in prompts]
    expected = [hf_greedy(folder, ids, n) for ids in prompt_ids]
    assert_meaningful(folder, prompt_ids, expected)
    for cache in ("dynamic", "static"):
        alone = [lm.generate(ids, n, stop_at_eos=False, cache=cache).token_ids for ids in prompt_ids]
        assert alone == expected, f"greedy tokens differ from transformers ({cache} cache)"
        batched = [r.token_ids for r in lm.generate_batch(prompt_ids, n, stop_at_eos=False, cache=cache)]
        assert batched == expected, f"batched greedy tokens differ from transformers ({cache} cache)"
        assert_logits_match(folder, prompt_ids[0], expected[0], cache)
