"""The cost of a JSON-schema constraint per token: the grammar's mask against the decode step.

Generates the same greedy JSON document twice on one model: constrained (`json_schema=`), timing
each step's mask (llguidance computing the allowed tokens, then -inf written over the rest of the
logits), and, as the reference, unconstrained but fed the same tokens, timing the decode steps.
Prints the mask's median and mean ms per token, the decode step's, their ratio, then one JSON document.

    python benchmarks/bench_grammar.py [--model M] [--tokens 96] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

import kvgen
from kvgen import grammar
from kvgen.cache import make_cache
from kvgen.generate import decode_one, prefill

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = "A user record for the site's administrator, Ada Lovelace, who lives in London, as JSON:"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = kvgen.load(args.model)
    started = time.perf_counter()
    (rule,) = lm.constraints(1, json_schema=SCHEMA)
    setup_s = time.perf_counter() - started  # the tokenizer's index (once per model) and the grammar
    ids = lm.encode(PROMPT)

    def run(constrained: bool, tokens: list[int] | None = None) -> tuple[list[int], list[float], list[float]]:
        cache = make_cache("dynamic", lm.model.cache_layout(), 1, len(ids) + args.tokens + 1, lm.dtype, lm.device)
        logits = prefill(lm.model, torch.tensor([ids]), torch.arange(len(ids))[None], cache)
        out, masks, steps = [], [], []
        for i in range(args.tokens):
            if constrained:
                t = time.perf_counter()
                logits = grammar.mask_logits(logits, [rule])
                masks.append(time.perf_counter() - t)
            token = int(logits.argmax(-1)) if tokens is None else tokens[i]
            out.append(token)
            if constrained:
                rule.advance(token)
            if token in lm.eos_token_ids or i + 1 == (args.tokens if tokens is None else len(tokens)):
                break
            t = time.perf_counter()
            logits = decode_one(lm.model, torch.tensor([token]), torch.tensor([len(ids) + i]), cache)
            steps.append(time.perf_counter() - t)
        return out, masks, steps

    tokens, masks, _ = run(True)
    _, _, steps = run(False, tokens)  # the same tokens, no mask: the decode step alone
    text = lm.tokenizer.decode([t for t in tokens if t not in lm.eos_token_ids])
    mask_ms, step_ms = statistics.median(masks) * 1e3, statistics.median(steps) * 1e3
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "model": str(lm.path.name),
        "vocab": lm.model.config.vocab_size,
        "tokens": len(tokens),
        "setup_s": round(setup_s, 3),
        "mask_ms_median": round(mask_ms, 3),
        "mask_ms_mean": round(statistics.mean(masks) * 1e3, 3),
        "mask_ms_max": round(max(masks) * 1e3, 3),
        "decode_step_ms_median": round(step_ms, 3),
        "mask_share_of_step": round(mask_ms / step_ms, 4),
        "valid_json": _parses(text),
        "text": text,
    }
    print(f"{doc['model']} ({doc['vocab']} tokens), {doc['cpu']}, {doc['threads']} threads")
    print(f"grammar setup {setup_s:.2f} s (once per model: the tokenizer's index)")
    print(f"mask {mask_ms:.3f} ms/token (median; mean {doc['mask_ms_mean']:.3f}, max {doc['mask_ms_max']:.2f})")
    print(f"decode step {step_ms:.2f} ms/token (median): the mask is {100 * mask_ms / step_ms:.1f}% of a step")
    print(json.dumps(doc))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
