"""kvgen vs transformers' generate() on the GPT-2 124M shape with random weights, float32.

Nothing is downloaded: the checkpoint is built in a temporary folder (`kvgen.testing.build_gpt2`),
then `kvgen bench` measures both systems on it, each in its own process (34-token prompt, 128 new
tokens by default). Any further arguments go to `kvgen bench` and win over these.

    python benchmarks/bench_decode.py [kvgen bench flags, e.g. --batch 1,8 -o gpt2.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from kvgen.cli import main
from kvgen.testing import build_gpt2

GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_gpt2(Path(tmp), scale=3.0, **GPT2_124M)
        flags = ["-m", str(folder), "--dtype", "float32", "--against", "hf", "--prompt-tokens", "34"]
        sys.exit(main(["bench", *flags, "--new-tokens", "128", *sys.argv[1:]]))
