"""What batch-invariant attention costs: a decode step with each row attending alone over its own
span (`layers.rowwise_attention`, what kvgen does) against one attention call over the padded batch.

The server's engine layout on the default model: a `RowLayerCache` whose rows hold prompts of
different lengths (500, 463, 426, ... tokens), one token decoded per busy row per step. Rounds
alternate between the two ways, on the same caches; prints the median step time of each and the
ratio, then one JSON document.

    python benchmarks/bench_batch_invariance.py [--model M] [--batch 1,8] [--rounds 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kvgen
import kvgen.models.layers as layers
from kvgen.cache import DynamicLayerCache, RowLayerCache
from kvgen.generate import decode_one
from kvgen.perplexity import long_text


def one_call(q, k, v, mask, scale, grouped):
    """The padded batch in one attention call (rows' sums then depend on the longest row)."""
    return layers._attend(q, k, v, mask, scale, grouped)


def filled_rows(lm, batch: int, longest: int) -> tuple[list[RowLayerCache], list[int]]:
    """Row caches holding `batch` prompts of different lengths, as the engine leaves them."""
    model = lm.model
    ids = lm.encode(long_text()[:20_000])[:longest]
    caches = [RowLayerCache(batch, shape, lm.dtype, lm.device) for shape in model.cache_layout()]
    lengths = [longest - 37 * row for row in range(batch)]
    for row, n in enumerate(lengths):
        prompt = [DynamicLayerCache(None, shape.group_size) for shape in model.cache_layout()]
        model(torch.tensor([ids[:n]]), torch.arange(n)[None], prompt)
        for cache, held in zip(caches, prompt):
            cache.put(row, held.keys, held.values, held.positions)
    return caches, lengths


def step_ms(lm, caches, lengths, attend, steps: int) -> float:
    """Median milliseconds of `steps` decode steps from the filled state (restored first)."""
    layers.rowwise_attention, kept = attend, layers.rowwise_attention
    saved = [cache.lengths.clone() for cache in caches]
    tokens = torch.zeros(len(lengths), dtype=torch.long)
    positions = torch.tensor(lengths)
    times = []
    try:
        for i in range(steps):
            started = time.perf_counter()
            decode_one(lm.model, tokens, positions + i, caches)
            times.append(time.perf_counter() - started)
    finally:
        layers.rowwise_attention = kept
        for cache, length in zip(caches, saved):
            cache.lengths.copy_(length)
            for row, n in enumerate(length.tolist()):
                cache.positions[row, n:] = -1
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    lm = kvgen.load(args.model)
    results = {}
    with torch.inference_mode():
        for batch in (int(b) for b in args.batch.split(",")):
            caches, lengths = filled_rows(lm, batch, 500)
            ways = {"rowwise": layers.rowwise_attention, "one call": one_call}
            samples = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, attend in ways.items():
                    samples[name].append(step_ms(lm, caches, lengths, attend, args.steps))
            rowwise, one = statistics.median(samples["rowwise"]), statistics.median(samples["one call"])
            results[batch] = {"rowwise_ms": rowwise, "one_call_ms": one, "cost": rowwise / one - 1}
            print(
                f"batch {batch}: rowwise {rowwise:.1f} ms/step, one call {one:.1f} ms/step, cost {rowwise / one - 1:+.1%}"
            )
    print(json.dumps({"model": args.model or "gemma-3-270m (embedded)", "dtype": str(lm.dtype),
                      "threads": torch.get_num_threads(), "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
