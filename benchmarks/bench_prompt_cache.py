"""Prompt-cache reuse in `kvgen serve`: time to first token with and without a shared long prefix.

Starts a real server (loopback, a free port), then per repeat sends three streaming chat-style
completions whose prompts are a long "system prompt" plus a short question:
  cold    a prefix the server has never seen (everything is prefilled);
  shared  the same prefix again with another question (only the question is prefilled);
  other   a fresh prefix of the same length (cold again: the cache did not simply get warmer).
Prints time to first token (TTFT) and the `cached_tokens` the server reported, then one JSON document.

    python benchmarks/bench_prompt_cache.py [--model M] [--prefix-tokens 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from serving import MODEL_NAME, kvgen_server

WORDS = (
    "the ship sailed north past the harbour lights while the crew argued about maps weather supper and "
    "whether the captain had ever seen the island he described so often in his letters home"
).split()


def prefix(seed: int, words: int) -> str:
    """A different long text for each seed (a rotated, shuffled-looking word stream)."""
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 3)) % len(WORDS)] for i in range(words)) + ".\n\n"


def ttft(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(seconds to the first streamed token, prompt tokens, cached tokens) of one streaming completion."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    start = time.perf_counter()
    first = None
    usage = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    return first, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="roughly; words are about one token each")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    name = MODEL_NAME
    with kvgen_server(args.model, "--dtype", args.dtype) as (_, url):
        ttft(url, name, "Warm up.", 2)  # first-call costs (allocations, lazy imports) out of the figures
        runs = {"cold": [], "shared": [], "other": []}
        for r in range(args.repeats):
            words = int(args.prefix_tokens * 0.9)
            runs["cold"].append(
                ttft(url, name, prefix(2 * r + 1, words) + "Question: where is the ship?", args.max_tokens)
            )
            runs["shared"].append(ttft(url, name, prefix(2 * r + 1, words) + "Question: who argued?", args.max_tokens))
            runs["other"].append(ttft(url, name, prefix(2 * r + 2, words) + "Question: who argued?", args.max_tokens))

    print(f"{'request':<8} {'prompt tok':>10} {'cached tok':>10} {'TTFT s (median)':>16}")
    results = {}
    for kind, samples in runs.items():
        seconds = statistics.median(s for s, _, _ in samples)
        prompt_tokens, cached = samples[-1][1], samples[-1][2]
        results[kind] = {"ttft_s": seconds, "prompt_tokens": prompt_tokens, "cached_tokens": cached}
        print(f"{kind:<8} {prompt_tokens:>10} {cached:>10} {seconds:>16.3f}")
    speedup = results["cold"]["ttft_s"] / results["shared"]["ttft_s"]
    print(f"shared prefix: first token {speedup:.1f}x sooner")
    print(json.dumps({"model": args.model or "gemma-3-270m (embedded)", "repeats": args.repeats,
                      "results": results, "ttft_speedup": speedup}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
