"""Soak: many clients against one `kvgen serve` for minutes. Does it hold?

Starts a real server (loopback, a free port), runs every greedy prompt once alone, then lets
`--clients` clients loop for `--seconds`, each request drawn at random from:
  greedy    temperature 0, streamed or not; prompts share long prefixes (the prompt cache at work),
            and each answer must equal the same request's solo run
  sampled   a streamed completion at temperature 0.8
  hang-up   a stream dropped after two chunks, or a whole reply given up by a client time-out
  bad       a malformed request, which must get a 4xx
Then it waits for the server to drain and reports: 5xx (and other unexpected) answers, slots still
held (/metrics: running + queued), the server's RSS at the start and the end, p50/p99 time to
first token of streamed requests, and how many greedy answers equal their solo runs.

    python benchmarks/soak.py [--model M] [--clients 64] [--seconds 300] [--json FILE] [-- SERVE ARGS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from collections import Counter

import httpx
from serving import MODEL_NAME, kvgen_server, rss_mb

from kvgen.perplexity import long_text

MAX_TOKENS = 24
BAD_BODIES = [
    {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": -1},
    {"model": "no-such-model", "prompt": "Hello", "max_tokens": 4},
    {"model": MODEL_NAME, "prompt": "Hello", "stop": ["a", "b", "c", "d", "e"]},
    {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "Hi"}]},
    {"model": MODEL_NAME, "prompt": "Hello", "temperature": "hot"},
    {"model": MODEL_NAME, "prompt": "", "max_tokens": 4},
]


def greedy_prompts() -> list[str]:
    """Four long shared prefixes (about 300 tokens of Shakespeare each) times four endings."""
    text = long_text()
    prefixes = [text[start : start + 1200] for start in (10_000, 60_000, 110_000, 160_000)]
    endings = ["\n\nSummary:", "\n\nWho speaks next?", "\n\nTranslate to modern English:", "\n\nThe moral:"]
    return [p + e for p in prefixes for e in endings]


def body(prompt: str, temperature: float, stream: bool) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": temperature,
            "stream": stream, "ignore_eos": True}  # fmt: skip


async def completion(http: httpx.AsyncClient, request: dict, stats: dict, hang_up_after: int | None = None) -> str:
    """One completion's text, streamed or not; records its status and, when streamed, its TTFT."""
    started = time.perf_counter()
    if not request["stream"]:
        response = await http.post("/v1/completions", json=request)
        stats["status"][response.status_code] += 1
        return response.json()["choices"][0]["text"] if response.status_code == 200 else ""
    text, chunks = [], 0
    async with http.stream("POST", "/v1/completions", json=request) as response:
        stats["status"][response.status_code] += 1
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                stats["stream_errors"] += 1
                break
            if chunks == 0:
                stats["ttft"].append(time.perf_counter() - started)
            chunks += 1
            text.append(chunk["choices"][0]["text"])
            if hang_up_after is not None and chunks >= hang_up_after:
                break  # leaving the block closes the connection mid-stream
    return "".join(text)


async def client(http: httpx.AsyncClient, prompts: list[str], solo: list[str], deadline: float, stats: dict) -> None:
    rng = random.Random()
    while time.monotonic() < deadline:
        kind = rng.choices(["greedy", "sampled", "hang-up", "bad"], weights=[6, 2, 1, 1])[0]
        i = rng.randrange(len(prompts))
        stats["kinds"][kind] += 1
        try:
            if kind == "greedy":
                text = await completion(http, body(prompts[i], 0, rng.random() < 0.5), stats)
                stats["greedy"] += 1
                stats["greedy_equal"] += text == solo[i]
            elif kind == "sampled":
                await completion(http, body(prompts[i], 0.8, True), stats)
            elif kind == "hang-up" and rng.random() < 0.5:
                await completion(http, body(prompts[i], 0, True), stats, hang_up_after=2)
            elif kind == "hang-up":
                try:
                    await http.post("/v1/completions", json=body(prompts[i], 0, False), timeout=0.3)
                except httpx.TimeoutException:
                    pass
            else:
                response = await http.post("/v1/completions", json=rng.choice(BAD_BODIES))
                stats["status"][response.status_code] += 1
                stats["bad_not_4xx"] += not 400 <= response.status_code < 500
        except httpx.HTTPError as e:
            stats["client_errors"][type(e).__name__] += 1


def metric(url: str, name: str) -> float:
    return float(re.search(rf"^kvgen_{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M).group(1))


async def soak(url: str, clients: int, seconds: float, prompts: list[str], solo: list[str]) -> dict:
    stats = {"status": Counter(), "kinds": Counter(), "client_errors": Counter(), "ttft": [],
             "greedy": 0, "greedy_equal": 0, "bad_not_4xx": 0, "stream_errors": 0}  # fmt: skip
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(http, prompts, solo, deadline, stats) for _ in range(clients)))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")
    parser.add_argument("serve_args", nargs="*", help="passed to kvgen serve (after --)")
    args = parser.parse_args()

    prompts = greedy_prompts()
    with kvgen_server(args.model, *args.serve_args) as (server, url):
        solo = [httpx.post(f"{url}/v1/completions", json=body(p, 0, False), timeout=600).json()["choices"][0]["text"]
                for p in prompts]  # fmt: skip
        rss_start = rss_mb(server.pid)
        started = time.monotonic()
        stats = asyncio.run(soak(url, args.clients, args.seconds, prompts, solo))
        elapsed = time.monotonic() - started
        drained = time.monotonic() + 60
        while metric(url, "running_requests") + metric(url, "queue_depth") > 0 and time.monotonic() < drained:
            time.sleep(0.5)
        leaked = metric(url, "running_requests") + metric(url, "queue_depth")
        rss_end = rss_mb(server.pid)
        requests = {o: metric(url, f'requests_total{{outcome="{o}"}}') for o in ("finished", "cancelled", "failed")}

    ttft = sorted(stats["ttft"])
    figures = {
        "model": args.model or "gemma-3-270m (embedded)",
        "serve_args": args.serve_args,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests_sent": sum(stats["kinds"].values()),
        "by_kind": dict(stats["kinds"]),
        "status": {str(k): v for k, v in sorted(stats["status"].items())},
        "server_errors_5xx": sum(v for k, v in stats["status"].items() if k >= 500),
        "bad_requests_not_4xx": stats["bad_not_4xx"],
        "stream_errors": stats["stream_errors"],
        "client_errors": dict(stats["client_errors"]),
        "engine_requests": requests,
        "leaked_slots": leaked,
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end / rss_start - 1), 2),
        "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3) if ttft else None,
        "greedy_equal_solo": f"{stats['greedy_equal']}/{stats['greedy']}",
    }
    for key, value in figures.items():
        print(f"{key:<22} {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
