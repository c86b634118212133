"""Reading a GGUF file (llama.cpp's format) in transformers' terms: config, tensors, tokenizer.

A GGUF holds a model's config as metadata under llama.cpp's key names, its tensors under
llama.cpp's names (some rewritten: Llama's q/k rows permuted, Gemma's norms offset by one, GPT-2's
Conv1D weights transposed), quantised in blocks, and its tokenizer as vocabulary arrays. Everything
here undoes exactly that, so that the result is the checkpoint transformers would have saved;
`convert.py` writes it out once as a model folder.

transformers' own GGUF loader (`transformers/modeling_gguf_pytorch_utils.py`) is the reference for
what each tensor means; the tests check both agree on the same files.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

GGUF_MAGIC = b"GGUF"

# general.architecture -> transformers model_type and class
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}

# Tensor storage types `gguf.quants.dequantize` unpacks (checked against an independent reference in the tests).
SUPPORTED_TYPES = frozenset("F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split())

# llama.cpp's per-layer tensor names -> transformers' (under `model.layers.N.`)
DECODER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms both sides of each sublayer; llama.cpp calls the pre-FFN one `ffn_norm`.
GEMMA3_LAYER = DECODER_LAYER | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
DECODER_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
GPT2_GLOBAL = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
NAMES = {
    "llama": (DECODER_GLOBAL, DECODER_LAYER, "model.layers"),
    "qwen2": (DECODER_GLOBAL, DECODER_LAYER, "model.layers"),
    "qwen3": (DECODER_GLOBAL, DECODER_LAYER, "model.layers"),
    "gemma3": (DECODER_GLOBAL, GEMMA3_LAYER, "model.layers"),
    "gpt2": (GPT2_GLOBAL, GPT2_LAYER, "transformer.h"),
}
# Tensors llama.cpp derives from a Llama config; the config carries them here (see `_llama3_rope`).
LLAMA_DERIVED = {"rope_freqs.weight"}

ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # dequantise big tensors 16M values at a time, to bound memory


class GGUFFile:
    """An open, validated GGUF: its metadata, and its tensors still in the file (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_magic(self.path)
        try:
            self.reader = _reader(self.path)
        except Exception as e:  # the reader raises whatever numpy does on garbage: name the file instead
            raise ValueError(f"{self.path} is truncated or corrupt: gguf cannot read it ({_reason(e)})") from None
        if (parts := self.value("split.count", 1)) > 1:
            raise ValueError(f"{self.path} is one of {parts} split GGUF parts; merge them (llama-gguf-split --merge)")
        size = self.path.stat().st_size
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            end = t.data_offset + t.n_bytes  # absolute: the reader adds the data section start
            if end > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{self.path} is truncated: tensor {t.name} ends at byte {end}, the file has {size}")
        self.architecture = self.value("general.architecture", None)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path}: unsupported GGUF architecture {self.architecture!r}; "
                f"kvgen converts: {', '.join(sorted(ARCHITECTURES))}"
            )
        if "token_embd.weight" not in self.tensors:
            raise ValueError(f"{self.path} has no token_embd.weight: not a complete language model")
        bad = sorted({t.tensor_type.name for t in self.reader.tensors} - SUPPORTED_TYPES)
        if bad:
            examples = [t.name for t in self.reader.tensors if t.tensor_type.name in bad][:3]
            raise ValueError(
                f"{self.path}: unsupported tensor type {', '.join(bad)} (in {', '.join(examples)}); "
                f"kvgen dequantises: {', '.join(sorted(SUPPORTED_TYPES))}"
            )

    def value(self, key: str, default: Any = ...) -> Any:
        """One metadata value as Python (str, int, float, bool or list); `default` if absent."""
        from gguf import GGUFValueType

        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            # the shortest decimal that is this float32: 1e-06, not 9.999999974752427e-07
            value = float(str(np.float32(value)))
        return value

    def arch_value(self, key: str, default: Any = ...) -> Any:
        return self.value(f"{self.architecture}.{key}", default)

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    def type_counts(self) -> dict[str, int]:
        """How many tensors each storage type holds, e.g. {"Q4_K": 27, "F32": 109}."""
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts


def _reader(path: Path):
    """gguf's GGUFReader, reading arrays whole.

    The reader cuts the header into one small array per value: three per token of a vocabulary, 4.6
    s for Gemma's 262k tokens. Here an array of numbers is one view, and an array of strings a walk
    over their lengths keeping a memoryview of each (what `ReaderField.contents` reads back); and
    the reader slices a plain ndarray view of its memory map, ~3x cheaper than an `np.memmap`'s.
    """
    from gguf import GGUFReader, GGUFValueType

    class Reader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._mapped

        @data.setter
        def data(self, mapped: np.memmap) -> None:
            self._mapped = np.asarray(mapped)

        def _get_field_parts(self, offset: int, raw_type: int):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":  # "I": the file's order is ours
                return super()._get_field_parts(offset, raw_type)
            item_type, count = self._get(offset, np.uint32), self._get(offset + 4, np.uint64)
            kind, n, start = GGUFValueType(item_type[0]), int(count[0]), offset + 12
            types = [GGUFValueType.ARRAY, kind] if n else [GGUFValueType.ARRAY]
            if (number := self.gguf_scalar_to_np.get(kind)) is not None:
                values = self._get(start, number, n)
                return 12 + values.nbytes, [item_type, count, values], [2], types
            if kind != GGUFValueType.STRING:  # arrays of arrays: as gguf reads them
                return super()._get_field_parts(offset, raw_type)
            view, end, strings = memoryview(self.data), start, []
            for _ in range(n):
                (length,) = struct.unpack_from("=Q", view, end)
                strings.append(view[end + 8 : end + 8 + length])
                end += 8 + length
            return end - offset, [item_type, count, *strings], list(range(2, 2 + n)), types

    return Reader(path)


def check_magic(path: Path) -> None:
    """Raise a one-line error unless `path` is an existing file starting with the GGUF magic."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}")


def is_gguf(path: str | Path) -> bool:
    """A path ending in .gguf, or a file whose first bytes are the GGUF magic."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- config ------------------------------------------------------------------------------------


def config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The transformers config.json dict this file's metadata describes."""
    model_type, class_name = ARCHITECTURES[g.architecture]
    config: dict[str, Any] = dict(
        model_type=model_type,
        architectures=[class_name],
        vocab_size=int(g.tensors["token_embd.weight"].shape[-1]),  # ggml order: (hidden, vocab)
        bos_token_id=g.value("tokenizer.ggml.bos_token_id", None),
        eos_token_id=g.value("tokenizer.ggml.eos_token_id", None),
        pad_token_id=g.value("tokenizer.ggml.padding_token_id", None),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        tie_word_embeddings="output.weight" not in g.tensors,
    )
    if g.architecture == "gpt2":
        return config | dict(
            n_layer=g.arch_value("block_count"),
            n_embd=g.arch_value("embedding_length"),
            n_head=g.arch_value("attention.head_count"),
            n_inner=g.arch_value("feed_forward_length", None),
            n_positions=g.arch_value("context_length"),
            layer_norm_epsilon=g.arch_value("attention.layer_norm_epsilon", 1e-5),
        )
    heads = g.arch_value("attention.head_count")
    hidden = g.arch_value("embedding_length")
    rotary = g.arch_value("rope.dimension_count", None)
    head_dim = g.arch_value("attention.key_length", None) or rotary or hidden // heads
    if rotary not in (None, head_dim):
        raise ValueError(f"{g.path}: partial rotary embeddings (over {rotary} of {head_dim} dims) are not supported")
    config |= dict(
        hidden_size=hidden,
        intermediate_size=g.arch_value("feed_forward_length"),
        num_hidden_layers=g.arch_value("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=g.arch_value("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=g.arch_value("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=g.arch_value("context_length"),
    )
    rope = {"rope_type": "default", "rope_theta": float(g.arch_value("rope.freq_base", 10000.0))} | _rope_scaling(g)
    if g.architecture == "llama":
        if "rope_freqs.weight" in g.tensors:
            rope |= _llama3_rope(g, rope["rope_theta"], head_dim)
        config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    if g.architecture == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    if g.architecture != "gemma3":
        return config | dict(rope_parameters=rope)

    # Gemma 3: sliding-window layers with their own RoPE base, and global ones every few layers.
    layers = config["num_hidden_layers"]
    pattern = g.arch_value("attention.sliding_window_pattern", 6)  # llama.cpp's fixed period when absent
    if isinstance(pattern, list):  # newer files: one flag per layer, true = sliding
        layer_types = ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
    else:
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    sliding_rope = {"rope_type": "default", "rope_theta": float(g.arch_value("rope.freq_base_swa", 10000.0))}
    if (scale := g.arch_value("attention.scale", None)) is not None:
        query_pre_attn_scalar = scale**-2
    elif layers == 62:  # llama.cpp's rule: 27B scales by hidden / heads, the rest by head_dim
        query_pre_attn_scalar = hidden // heads
    else:
        query_pre_attn_scalar = head_dim
    return config | dict(
        sliding_window=g.arch_value("attention.sliding_window"),
        layer_types=layer_types,
        query_pre_attn_scalar=query_pre_attn_scalar,
        final_logit_softcapping=g.arch_value("final_logit_softcapping", None),
        rope_parameters={"full_attention": rope, "sliding_attention": sliding_rope},
    )


def _rope_scaling(g: GGUFFile) -> dict[str, Any]:
    """RoPE scaling stated in metadata (`rope.scaling.*`), as transformers' rope_parameters keys."""
    kind = g.arch_value("rope.scaling.type", "none")
    if kind == "none":
        return {}
    factor = float(g.arch_value("rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        if (original := g.arch_value("rope.scaling.original_context_length", None)) is not None:
            out["original_max_position_embeddings"] = original
        for key in ("beta_fast", "beta_slow"):
            if (value := g.arch_value(f"rope.scaling.yarn_{key}", None)) is not None:
                out[key] = float(value)
        return out
    raise ValueError(f"{g.path}: unsupported RoPE scaling type {kind!r}; kvgen knows: none, linear, yarn, llama3")


def _llama3_rope(g: GGUFFile, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1's RoPE scaling, recovered from the per-frequency factors llama.cpp stores instead.

    The factors are 1 for short wavelengths w, `factor` for long ones, and in between
    1 / f = (1 - s) / factor + s with s = a / w - b, where a = L / (high - low), b = low / (high - low)
    and L is the original context length. So a least-squares fit of s over the in-between
    frequencies gives a and b; any L then reproduces the same factors.
    """
    factors = dequantize(g.tensors["rope_freqs.weight"]).astype(np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(factors) != len(inv_freq):
        raise ValueError(f"{g.path}: rope_freqs has {len(factors)} factors, head_dim {head_dim} needs {len(inv_freq)}")
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return {}
    wavelen = 2 * math.pi / inv_freq
    original = float(g.arch_value("rope.scaling.original_context_length", 8192))
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if medium.sum() >= 2:
        s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = np.linalg.lstsq(np.stack([1 / wavelen[medium], -np.ones(medium.sum())], 1), s, rcond=None)[0]
        low = b * original / a
        high = low + original / a
    else:  # too few in-between frequencies to pin the blend: Llama 3.1's own values, if they fit
        low, high = 1.0, 4.0
    rope = dict(
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(low),
        high_freq_factor=float(high),
        original_max_position_embeddings=int(original),
    )
    smooth = np.clip((original / wavelen - low) / (high - low), 0, 1)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError(f"{g.path}: rope_freqs does not follow Llama 3's RoPE scaling; cannot express it in a config")
    return rope


# --- tensors -----------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """One output tensor: its transformers name and shape, where it comes from, and how to fix it."""

    name: str
    shape: tuple[int, ...]
    source: Any  # gguf.ReaderTensor
    fix: Callable[[Tensor], Tensor] | None  # None: rows come out as stored, so big tensors stream in chunks

    @property
    def nbytes_in_file(self) -> int:
        return int(self.source.n_bytes)


def tensor_plan(g: GGUFFile, config: dict[str, Any]) -> list[TensorPlan]:
    """Every tensor of the file under transformers' name, with what llama.cpp's converter did to it undone."""
    globals_, layer, prefix = NAMES[g.architecture]
    plan = []
    for t in g.reader.tensors:
        if g.architecture == "llama" and t.name in LLAMA_DERIVED:
            continue
        match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", t.name)
        table = layer if match and match[1] is not None else globals_
        if not match or match[2] not in table:
            raise ValueError(f"{g.path}: unexpected tensor {t.name!r} for architecture {g.architecture}")
        block, leaf, kind = match.groups()
        name = f"{prefix}.{block}.{table[leaf]}.{kind}" if block is not None else f"{table[leaf]}.{kind}"
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dimensions innermost first
        fix = _fix(g.architecture, leaf, kind, config)
        if g.architecture == "gpt2" and kind == "weight" and leaf in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
            shape = shape[::-1]
        plan.append(TensorPlan(name, shape, t, fix))
    return plan


def _fix(architecture: str, leaf: str, kind: str, config: dict[str, Any]) -> Callable[[Tensor], Tensor] | None:
    """The inverse of what llama.cpp's converter did to this tensor, or None if it stored it as is."""
    if architecture == "llama" and leaf in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if leaf == "attn_q" else config["num_key_value_heads"]
        return lambda w: unpermute_rope_rows(w, heads)
    if architecture == "gemma3" and leaf.endswith("norm") and kind == "weight":
        return lambda w: w - 1  # llama.cpp stores Gemma's (1 + w) RMSNorm scale whole
    if architecture == "gpt2" and kind == "weight" and leaf in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        return lambda w: w.t().contiguous()  # back to transformers' Conv1D (in, out) layout
    return None


def unpermute_rope_rows(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's Llama q/k row order.

    transformers' RoPE rotates a head's first half against its second half; llama.cpp's rotates
    adjacent pairs, so its converter interleaves each head's two halves. Reading the rows as
    (head, pair, half) and swapping the last two puts the halves back.
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(t) -> np.ndarray:
    """A GGUF tensor's values as float32, in transformers' (rows, columns) order."""
    from gguf import GGMLQuantizationType, quants

    values = quants.dequantize(t.data, GGMLQuantizationType(t.tensor_type))
    return values.reshape([int(d) for d in reversed(t.shape.tolist())])


def tensor_chunks(item: TensorPlan, dtype: torch.dtype) -> Iterator[tuple[Tensor, int]]:
    """`item`'s values in `dtype`, as (chunk of rows, bytes of the file it came from).

    Tensors stored as is come a few million values at a time, so a large embedding never sits in
    memory whole in float32; those with a fix-up (small: norms, q/k, GPT-2 projections) come whole.
    """
    data = item.source.data
    if item.fix is not None or data.ndim < 2:
        values = torch.from_numpy(np.array(dequantize(item.source), dtype=np.float32))
        values = item.fix(values) if item.fix is not None else values
        yield values.to(dtype).reshape(item.shape), item.nbytes_in_file
        return
    rows = data.shape[0]
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, math.prod(item.shape[1:])))
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(item.source.tensor_type)
    for start in range(0, rows, step):
        part = data[start : start + step]
        values = np.array(quants.dequantize(part, qtype), dtype=np.float32)  # a writable copy
        yield torch.from_numpy(values).to(dtype), part.nbytes


# --- tokenizer ---------------------------------------------------------------------------------


def save_tokenizer(g: GGUFFile, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json for this file, encoding as transformers' own GGUF tokenizer.

    The tokenizer is the one transformers builds from the file (vocabulary, merges, scores, token
    types, special tokens); tokenizer_config.json then names the generic `TokenizersBackend`, which
    loads tokenizer.json as saved, and lists the added tokens, as Hub checkpoints do. Both spare
    transformers a second parse of tokenizer.json in Python on every load: 4.4 s -> 1.8 s for
    Gemma's 262k-token vocabulary, with identical encodings.
    """
    tokenizer = build_tokenizer(g)
    tokenizer.save_pretrained(folder, save_jinja_files=False)  # a chat template goes inside tokenizer_config.json
    compact_merges(folder / "tokenizer.json")
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    for key in ("name_or_path", "is_local", "local_files_only"):  # where it was built, not what it is
        settings.pop(key, None)
    settings["tokenizer_class"] = "TokenizersBackend"
    settings["added_tokens_decoder"] = {
        str(i): dict(
            content=t.content,
            lstrip=t.lstrip,
            normalized=t.normalized,
            rstrip=t.rstrip,
            single_word=t.single_word,
            special=t.special,
        )
        for i, t in sorted(tokenizer.backend_tokenizer.get_added_tokens_decoder().items())
    }
    settings.update(tokenizer_settings(g))
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def compact_merges(path: Path) -> None:
    """A BPE tokenizer.json's merges as "a b" strings, the older form, in place of the pairs that
    tokenizers writes, where no token holds a space: it parses those ~20 % faster, and a large
    vocabulary's parse is most of a warm load (figures in docs/speed.md)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges") or []
    if not merges or not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return
    data["model"]["merges"] = [" ".join(m) for m in merges]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_tokenizer(g: GGUFFile):
    """transformers' own GGUF tokenizer for this file: the class `AutoTokenizer` picks for the model
    type (without parsing the whole file once more to learn it), built from the file.

    transformers reads a GGUF's tokenizer next to whatever else is in its folder (a stray
    tokenizer.json would win), so the file is linked alone into a scratch folder first.
    """
    from transformers import TokenizersBackend
    from transformers.models.auto import CONFIG_MAPPING, TOKENIZER_MAPPING

    tokenizer_class = TOKENIZER_MAPPING.get(CONFIG_MAPPING[g.model_type], None) or TokenizersBackend
    with tempfile.TemporaryDirectory(prefix="kvgen-gguf-") as scratch:
        link = Path(scratch) / "model.gguf"
        try:
            os.symlink(g.path.resolve(), link)
        except OSError:  # a filesystem without links
            shutil.copyfile(g.path, link)
        try:
            return tokenizer_class.from_pretrained(scratch, gguf_file=link.name)
        except Exception as e:
            raise ValueError(f"{g.path}: cannot build its tokenizer ({_reason(e)})") from None


def tokenizer_settings(g: GGUFFile) -> dict[str, Any]:
    """What the GGUF states about encoding: BOS/EOS adding (also in tokenizer.json's post-processor,
    which transformers follows) and the chat template."""
    settings: dict[str, Any] = {}
    add_bos = g.value("tokenizer.ggml.add_bos_token", None)
    if add_bos is None and g.value("tokenizer.ggml.model", None) == "llama":
        add_bos = True  # sentencepiece vocabularies add BOS unless they say otherwise (llama.cpp, transformers)
    if add_bos is not None:
        settings["add_bos_token"] = bool(add_bos)
    if (add_eos := g.value("tokenizer.ggml.add_eos_token", None)) is not None:
        settings["add_eos_token"] = bool(add_eos)
    if (template := g.value("tokenizer.chat_template", None)) is not None:
        settings["chat_template"] = template
    return settings


def generation_eos_ids(g: GGUFFile) -> list[int]:
    """Every id that ends a turn: EOS, plus end-of-turn and end-of-message where the file names them."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = g.value(f"tokenizer.ggml.{key}", None)
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids
