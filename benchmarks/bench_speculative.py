"""Prompt-lookup speculative decoding on the embedded default model (Gemma 3 270M), batch 1, greedy.

Two tasks: "copy", where the continuation repeats a paragraph of the prompt (as when a model is
asked to repeat or edit a given text), and "free", a story opening with little to copy. Each task
runs plain greedy decoding and `speculative="prompt_lookup"` side by side in one process, after a
warm-up, `--repeats` times each (the median run is kept). Prints decode tok/s both ways, tokens
gained per decode forward and the speed-up, then one JSON document.

The tokens should be identical; `first_difference` says where they are not. In float32 they are;
in bfloat16 a verification forward over several positions may break an exact tie between two
logits the other way from a one-token decode step (as a prefill may), and the texts then part.

    python benchmarks/bench_speculative.py [--new-tokens 96] [--draft-tokens 4] [--ngram-size 3] [--repeats 3] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json

import torch

import kvgen

PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way."
)
TASKS = {
    # A base model copies a text it has seen twice in the same layout.
    "copy": f"Original:\n{PARAGRAPH}\n\nCopy:\n{PARAGRAPH}\n\nCopy:\n",
    "free": "Once upon a time, in a small village at the edge of a great forest, there lived",
}


def run(lm: kvgen.LM, prompt: str, n: int, repeats: int, **kwargs) -> kvgen.Result:
    lm.generate(prompt, 8, stop_at_eos=False, **kwargs)  # warm-up
    results = [lm.generate(prompt, n, stop_at_eos=False, **kwargs) for _ in range(repeats)]
    return sorted(results, key=lambda r: r.timings.decode_s)[len(results) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--ngram-size", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="dynamic", choices=("dynamic", "static"))
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    lm = kvgen.load(dtype=args.dtype)
    spec = {"speculative": "prompt_lookup", "draft_tokens": args.draft_tokens, "ngram_size": args.ngram_size}
    rows = {}
    for task, prompt in TASKS.items():
        plain = run(lm, prompt, args.new_tokens, args.repeats, cache=args.cache)
        fast = run(lm, prompt, args.new_tokens, args.repeats, cache=args.cache, **spec)
        stats = fast.timings.speculative
        rows[task] = {
            "prompt_tokens": plain.timings.prompt_tokens,
            "new_tokens": plain.timings.new_tokens,
            "identical_tokens": fast.token_ids == plain.token_ids,
            "first_difference": next(
                (i for i, (a, b) in enumerate(zip(plain.token_ids, fast.token_ids)) if a != b), None
            ),
            "plain_decode_tok_s": plain.timings.decode_tok_s,
            "speculative_decode_tok_s": fast.timings.decode_tok_s,
            "speed_up": fast.timings.decode_tok_s / plain.timings.decode_tok_s,
            **stats.as_dict(),
            "text": fast.text[:120],
        }

    print(
        f"{'task':<6} {'prompt':>6} {'new':>4} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
        f"{'tok/forward':>11} {'accepted':>9} {'same':>5}"
    )
    for task, r in rows.items():
        print(
            f"{task:<6} {r['prompt_tokens']:>6} {r['new_tokens']:>4} {r['plain_decode_tok_s']:>11.1f} "
            f"{r['speculative_decode_tok_s']:>10.1f} {r['speed_up']:>7.2f}x {r['tokens_per_step']:>11.2f} "
            f"{r['accepted']:>4}/{r['drafted']:<4} {r['identical_tokens']!s:>5}"
        )
    doc = {
        "model": str(lm.path),
        "dtype": str(lm.dtype),
        "cache": args.cache,
        "threads": torch.get_num_threads(),
        "draft_tokens": args.draft_tokens,
        "ngram_size": args.ngram_size,
        "tasks": rows,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
