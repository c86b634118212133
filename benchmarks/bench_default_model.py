"""The embedded default model (Gemma 3 270M GGUF): kvgen vs transformers' own GGUF load, batch 1, greedy.

Each system runs in a fresh subprocess, so its load time and peak RSS are its own. kvgen loads cold
(an empty temporary KVGEN_CACHE: the GGUF is converted) in one process and warm (the filled cache)
in the next; the warm one is timed. transformers loads the GGUF itself (`gguf_file=`) and runs its
`generate()`. Every system gets the same prompt ids, warms up on them, then generates `--new-tokens`
tokens through EOS `--repeats` times (median). Greedy tokens are compared with transformers in
float32, the exactness reference (bfloat16 rows may differ). Prints a table, then one JSON document.

    python benchmarks/bench_default_model.py [--new-tokens 64] [--prompt-tokens 500] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The opening of A Tale of Two Cities (public domain), repeated until the prompt is long enough.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way - in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only.\n\n"
)
REFERENCE = "transformers GGUF, float32"


def memory_gb() -> dict[str, float]:
    """Resident set now and at its peak (VmRSS, VmHWM), in GB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {key: int(status[field].split()[0]) for key, field in (("rss_gb", "VmRSS"), ("peak_rss_gb", "VmHWM"))}
    return {key: value * 1024 / 1e9 for key, value in kb.items()}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every tensor once (a tied head once), but only one row
    of an embedding table used just as a lookup. Gemma's tied head reads the whole table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips tied duplicates
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and id(m.weight) not in matrices:
            total -= (m.weight.shape[0] - 1) * m.weight[0].numel() * m.weight.element_size()
    return total


def hf_generate(model, ids: list[int], n: int) -> tuple[list[int], float, float]:
    """transformers' generate(), timed per token by a streamer: (tokens, prefill s, decode s)."""
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value) -> None:
            stamps.append(time.perf_counter())  # the first call hands over the prompt

        def end(self) -> None:
            pass

    start = time.perf_counter()
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
        streamer=Clock(),  # eos_token_id=[]: through EOS
    )
    return out[0, len(ids) :].tolist(), stamps[1] - start, stamps[-1] - stamps[1]


def child(spec: dict) -> dict:
    """Load one system, then (unless `load_only`) warm it up and time it. Runs in its own process."""
    torch.set_num_threads(spec["threads"])
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    import kvgen
    from kvgen.loading.convert import conversion_record

    path = kvgen.loading.default_model()
    start = time.perf_counter()
    if spec["system"] == "kvgen":
        lm = kvgen.load(dtype=spec["dtype"])  # the default model, through $KVGEN_CACHE
        out = dict(load_s=time.perf_counter() - start)
        if spec["load_only"]:
            out["convert_s"] = (conversion_record(lm.path) or {}).get("seconds")
        model, encode = lm.model, lm.encode

        def run(ids, n):
            r = lm.generate(ids, n, stop_at_eos=False)
            return r.token_ids, r.timings.prefill_s, r.timings.decode_s
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = time.perf_counter()
        dtype = getattr(torch, spec["dtype"])
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
        out = dict(load_s=time.perf_counter() - start, tokenizer_s=loaded - start, model_s=time.perf_counter() - loaded)

        def encode(text):
            return tokenizer(text).input_ids

        def run(ids, n):
            return hf_generate(model, ids, n)

    if spec["load_only"]:
        return {**out, **memory_gb()}
    out["rss_after_load_gb"] = memory_gb()["rss_gb"]
    own_ids = encode(TEXT * (spec["prompt_tokens"] // 100 + 1))[: spec["prompt_tokens"]]
    ids = spec["ids"] or own_ids
    run(ids, 2)  # warm-up at the timed prompt length: kernel choice, first-touch pages
    runs = [run(ids, spec["new_tokens"]) for _ in range(spec["repeats"])]
    return dict(
        out,
        **memory_gb(),
        ids=ids,
        tokenizer_agrees=own_ids == ids,
        tokens=runs[0][0],
        same_tokens_every_repeat=all(r[0] == runs[0][0] for r in runs),
        weight_bytes_per_token=weight_bytes_per_token(model),
        prefill_tok_s=statistics.median(len(ids) / r[1] for r in runs),
        decode_tok_s=statistics.median((len(r[0]) - 1) / r[2] for r in runs),
    )


def spawn(spec: dict, cache: str | None = None) -> dict:
    """Run `child(spec)` in a fresh Python process (with KVGEN_CACHE=`cache`) and return its result."""
    env = dict(os.environ, TQDM_DISABLE="1", **({"KVGEN_CACHE": cache} if cache else {}))  # no GGUF-load bars
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # the child's last line is its result


def machine(threads: int) -> dict:
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return dict(
        processor=name,
        cores=os.cpu_count(),
        threads=threads,
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu_flags=[f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    base = dict(
        threads=args.threads,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        repeats=args.repeats,
        load_only=False,
    )
    results: dict[str, dict] = {}
    ids = None
    for dtype in ("bfloat16", "float32"):
        with tempfile.TemporaryDirectory(prefix="kvgen-cache-") as cache:
            print(f"kvgen {dtype}: cold load, then warm load and timing ...", file=sys.stderr, flush=True)
            cold = spawn(dict(base, system="kvgen", dtype=dtype, ids=ids, load_only=True), cache)
            warm = spawn(dict(base, system="kvgen", dtype=dtype, ids=ids), cache)
        ids = ids or warm["ids"]  # the first system's prompt ids go to every later one
        results[f"kvgen, {dtype}"] = dict(
            warm, load_cold_s=cold["load_s"], convert_s=cold["convert_s"], peak_rss_cold_gb=cold["peak_rss_gb"]
        )
    for dtype in ("float32", "bfloat16"):
        print(f"transformers {dtype}: GGUF load and timing ...", file=sys.stderr, flush=True)
        results[f"transformers GGUF, {dtype}"] = spawn(dict(base, system="transformers", dtype=dtype, ids=ids))

    reference = results[REFERENCE]["tokens"]
    report = dict(
        benchmark="embedded default model (Gemma 3 270M Q4_K_M GGUF), batch 1, greedy, through EOS, CPU",
        machine=machine(args.threads),
        prompt_tokens=len(ids),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        reference=REFERENCE,
        systems={},
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Gemma 3 270M, {len(ids)}-token prompt, {args.new_tokens} new tokens, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    columns = ("load s (cold / warm)", "peak RSS GB (cold / warm)", "prefill tok/s", "decode tok/s", "ms/token", "GB/s")
    for column in ("system", *columns, "= fp32 ref"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, r in results.items():
        tokens = r.pop("tokens")
        r.pop("ids")
        differ = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
        r.update(
            ms_per_token=1000 / r["decode_tok_s"],
            weight_mb_per_token=r["weight_bytes_per_token"] / 1e6,
            gb_s=r.pop("weight_bytes_per_token") * r["decode_tok_s"] / 1e9,
            tokens_equal_reference=tokens == reference,
            first_difference=differ,
        )
        report["systems"][name] = r
        cold = "load_cold_s" in r  # kvgen rows: cold process / warm process
        load = f"{r['load_cold_s']:.1f} / {r['load_s']:.1f}" if cold else f"{r['load_s']:.1f}"
        rss = f"{r['peak_rss_cold_gb']:.2f} / {r['peak_rss_gb']:.2f}" if cold else f"{r['peak_rss_gb']:.2f}"
        same = "yes" if tokens == reference else f"no (from token {differ})"
        speed = f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", f"{r['ms_per_token']:.1f}", f"{r['gb_s']:.2f}"
        table.add_row(name, load, rss, *speed, same)
    console = Console(width=150)
    console.print(table)
    console.print("bfloat16 rows may differ from the float32 reference; float32 rows should not.")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
