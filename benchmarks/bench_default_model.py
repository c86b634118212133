"""The embedded default model (Gemma 3 270M GGUF): kvgen beside transformers, in bfloat16 and float32.

A thin loop over `kvgen bench` (kvgen/bench.py does the measuring: each system in its own process,
the same prompt ids, warm-up excluded, median of repeats), once per dtype, so both engines are
compared at each. Any further arguments go to `kvgen bench` and win over these (the last of a
repeated flag counts), e.g. `--against hf,llama.cpp --batch 1,8 --new-tokens 128`.

    python benchmarks/bench_default_model.py [kvgen bench flags]
"""

from __future__ import annotations

import sys

from kvgen.cli import main

if __name__ == "__main__":
    statuses = [
        main(["bench", "--dtype", dtype, "--against", "hf", *sys.argv[1:]]) for dtype in ("bfloat16", "float32")
    ]
    sys.exit(max(statuses))
