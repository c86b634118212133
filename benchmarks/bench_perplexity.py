"""StreamingLLM's Figure 3 on the embedded default model: perplexity of a long text under each cache policy.

Streams the first `--tokens` tokens of the built-in long text (four Shakespeare tragedies) through
Gemma 3 270M token by token under `dense`, `window`, `sink` and `recompute` (see
`kvgen.perplexity`), scoring every `--every`-th token, the same tokens for each policy. Policies
run in `--jobs` worker processes side by side, one thread each, so on a 2-core machine the four
take about half the time; each run's decode tok/s is then a one-thread figure next to another busy
core. Prints a Markdown table (perplexity, decode tok/s, cache bytes) and writes every run's NLLs as
JSON and the plot.

    python benchmarks/bench_perplexity.py [--tokens 20000] [--window 512] [--sink-tokens 4] [--every 10]
        [--jobs 2] [--dtype auto] [-o docs/perplexity.json] [--plot docs/perplexity.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

import kvgen
from kvgen.perplexity import POLICIES, PerplexityRun, long_text, perplexity, perplexity_figure
from kvgen.trace import save_figure, write_atomic


def run_policy(policy: str, ids: list[int], args: argparse.Namespace) -> PerplexityRun:
    """One policy in a worker process, with a progress line on stderr every 10 % of the text."""
    torch.set_num_threads(1)
    lm = kvgen.load(dtype=args.dtype)
    started, next_report = time.perf_counter(), len(ids) // 10

    def report(run: PerplexityRun) -> None:
        nonlocal next_report
        if run.scored[-1] >= next_report:
            next_report += len(ids) // 10
            elapsed = time.perf_counter() - started
            print(
                f"{policy:>9}: token {run.scored[-1]:>6}, ppl {run.perplexity:8.3f}, {elapsed:6.0f} s", file=sys.stderr
            )

    window = None if policy == "dense" else args.window
    return perplexity(lm.model, ids, policy, window, args.sink_tokens, args.every, on_token=report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sink-tokens", type=int, default=4)  # named as kvgen's own commands name it
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("-o", "--output", default="docs/perplexity.json")
    parser.add_argument("--plot", default="docs/perplexity.png")
    args = parser.parse_args()

    lm = kvgen.load(dtype=args.dtype)
    ids = lm.encode(long_text())[: args.tokens]
    dtype = str(lm.dtype).removeprefix("torch.")
    policies = args.policies.split(",")
    print(f"{len(ids)} tokens, {dtype}, every {args.every}th scored, {args.jobs} jobs", file=sys.stderr)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(run_policy, policies, [ids] * len(policies), [args] * len(policies)))

    print(
        f"\nGemma 3 270M ({dtype}), the first {len(ids):,} tokens of the built-in text, every {args.every}th scored\n"
    )
    print("| policy | kept (sinks + recent) | tokens scored | perplexity | decode tok/s | cache bytes |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        kept = "all" if run.window is None else f"{run.sinks} + {run.window}"
        row = (run.policy, kept, f"{run.tokens:,}", f"{run.perplexity:.2f}", f"{run.tok_s:.1f}", f"{run.cache_bytes:,}")
        print("| " + " | ".join(row) + " |")
    doc = {"model": "default (Gemma 3 270M)", "text": "built-in (4 Shakespeare tragedies)", "tokens": len(ids)}
    doc |= {"every": args.every, "dtype": dtype, "threads_per_run": 1, "jobs": args.jobs}
    doc["runs"] = [run.as_dict() for run in runs]
    write_atomic(args.output, json.dumps(doc, indent=1).encode())
    title = f"Gemma 3 270M ({dtype}): {len(ids):,} tokens of Shakespeare, every {args.every}th scored"
    save_figure(perplexity_figure(runs, title), args.plot)


if __name__ == "__main__":
    main()
