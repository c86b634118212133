"""Decode speed of kvgen's loop vs transformers' generate() on the GPT-2 124M shape, batch 1.

Random weights (nothing is downloaded), float32, greedy, the same prompt ids for every system.
Systems alternate within one run, so a busy machine slows them alike; each figure is the median
of `--repeats` runs. Prints a table, then one JSON document.

    python benchmarks/bench_decode.py [--new-tokens 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

import kvgen
from kvgen.cli import first_difference
from kvgen.testing import build_gpt2

GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of"


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix once, but only one row of each embedding
    table that is used as a lookup (the tied LM head still reads all of wte)."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    wpe = model.transformer.wpe.weight if hasattr(model, "transformer") and hasattr(model.transformer, "wpe") else None
    return total - (wpe.numel() * wpe.element_size() if wpe is not None else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_gpt2(Path(tmp), scale=3.0, **GPT2_124M)
        systems = {
            "transformers generate()": (kvgen.load(folder, dtype="float32", backend="hf"), "dynamic"),
            "kvgen, dynamic cache": (kvgen.load(folder, dtype="float32"), "dynamic"),
            "kvgen, static cache": (kvgen.load(folder, dtype="float32"), "static"),
        }
        prompt_ids = systems["kvgen, dynamic cache"][0].encode(PROMPT)
        runs: dict[str, list] = {name: [] for name in systems}
        for lm, cache in systems.values():  # warm-up
            lm.generate(prompt_ids, 8, stop_at_eos=False, cache=cache)
        for _ in range(args.repeats):
            for name, (lm, cache) in systems.items():
                runs[name].append(lm.generate(prompt_ids, args.new_tokens, stop_at_eos=False, cache=cache))
        tokens = {name: [r.token_ids for r in results] for name, results in runs.items()}
        reference = tokens["transformers generate()"][0]
        bytes_per_token = weight_bytes_per_token(systems["kvgen, dynamic cache"][0].model)

    report = dict(
        benchmark="decode, GPT-2 124M shape, random weights, float32, batch 1, greedy",
        machine=dict(
            processor=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__
        ),
        prompt_tokens=len(prompt_ids),
        new_tokens=args.new_tokens,
        weight_mb_per_token=bytes_per_token / 1e6,
        systems={},
    )
    base = None
    print(
        f"{'system':<26} {'decode tok/s':>12} {'ms/token':>9} {'GB/s':>6} {'prefill tok/s':>14} {'vs hf':>6}  identical"
    )
    for name, results in runs.items():
        decode = statistics.median(r.timings.decode_tok_s for r in results)
        prefill = statistics.median(r.timings.prefill_tok_s for r in results)
        base = base or decode
        diffs = [first_difference(reference, t) for t in tokens[name]]
        same = all(d is None for d in diffs)
        report["systems"][name] = dict(
            decode_tok_s=decode,
            ms_per_token=1000 / decode,
            gb_s=bytes_per_token * decode / 1e9,
            prefill_tok_s=prefill,
            speedup_vs_hf=decode / base,
            tokens_identical_to_hf=same,
            first_differences=diffs,
        )
        print(
            f"{name:<26} {decode:>12.1f} {1000 / decode:>9.2f} {bytes_per_token * decode / 1e9:>6.2f} {prefill:>14.0f} {decode / base:>5.2f}x  {same if same else diffs}"
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
