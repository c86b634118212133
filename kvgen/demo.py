"""`make demo`: way 1 (transformers' generate) and way 2 (kvgen's prefill + decode) on the same weights.

Until real weights ship with kvgen, the demo builds a small GPT-2 with random weights locally (no
download), so its text is gibberish by design: what the demo shows is that both ways produce the
same tokens, and how fast each is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import main as cli_main
from .testing import build_gpt2

DEMO_DIR = Path(".demo") / "gpt2-random"


def main() -> int:
    if not (DEMO_DIR / "config.json").is_file():
        print(f"building a random-weight GPT-2 (6 layers, 256 wide) in {DEMO_DIR} ...", file=sys.stderr)
        build_gpt2(DEMO_DIR, n_layer=6, n_embd=256, n_head=8, n_positions=512)
    print("Random weights, so the text is gibberish: the point is that both ways agree token for token.\n")
    return cli_main(["compare", "It was the best of times, it was the worst of times", "-m", str(DEMO_DIR), "-n", "48", "--ignore-eos"])


if __name__ == "__main__":
    sys.exit(main())
