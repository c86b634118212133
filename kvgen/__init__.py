"""kvgen: a small, readable LLM text-generation engine for PyTorch.

import kvgen
lm = kvgen.load("path/to/model")
print(lm.generate("Once upon a time", max_new_tokens=32).text)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .api import BACKENDS, LM, Response, Result, Timings
from .fast import speed_up
from .loading import default_model, load_native, read_config, resolve_model, return_freed_memory
from .loading.blocks import attach_blocks
from .loading.dtype import packing_pays, resolve_dtype
from .loading.gguf import is_gguf
from .loading.tokenizer import load_tokenizer
from .sampling import SamplingParams
from .screen import store_path as screen_store

__version__ = "0.1.0"
__all__ = ["load", "LM", "Result", "Response", "Timings", "SamplingParams"]


def _eos_token_ids(folder: Path, tokenizer) -> list[int]:
    """EOS ids as generation would use them: generation_config.json, then config.json, then the tokenizer."""
    sources = []
    if (folder / "generation_config.json").is_file():
        sources.append(json.loads((folder / "generation_config.json").read_text()).get("eos_token_id"))
    sources += [read_config(folder).get("eos_token_id"), tokenizer.eos_token_id]
    for eos in sources:
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def _check_gguf_blocks(source: str | Path, device: str | torch.device, backend: str, fast: bool, screen: bool) -> None:
    if not is_gguf(source):
        raise ValueError(f"gguf_blocks needs a GGUF file; {source} is not one")
    if torch.device(device).type != "cpu" or backend != "native" or not fast:
        raise ValueError("gguf_blocks are read by the compiled step of the native fast path on a CPU only")
    if screen:
        raise ValueError("gguf_blocks and screen_head both replace the LM head's product: choose one")


def load(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    backend: str = "native",
    fast: bool = True,
    screen_head: bool = False,
    gguf_blocks: bool = False,
) -> LM:
    """Load a model folder (config.json, safetensors or pytorch_model.bin, tokenizer files), a GGUF
    file (converted once into $KVGEN_CACHE, then loaded from there) or a hub id already in the local
    Hugging Face cache. Without `model`, the embedded default: Gemma 3 270M (base, Q4_K_M GGUF).

    `dtype="auto"` takes whichever of float32 and bfloat16 decodes faster on this machine
    (measured once per processor; bfloat16 on a GPU).

    `backend="native"` runs kvgen's own model and loop; `backend="hf"` runs transformers'
    `generate()` on the same weights, behind the same API.

    `fast` (native backend) builds the decode fast path at load (`kvgen.fast`): fused q/k/v and
    gate/up projections, and on a CPU whose oneDNN kernel streams them faster, prepacked weights.
    `fast=False` keeps the plain reference modules; greedy output is the same either way.

    `screen_head` (fast path, x86 CPU) makes greedy steps pick their token from an int8 copy of the
    LM head and confirm it exactly (`kvgen.screen`): the same tokens, from half the head's bytes.
    Its int8 copy is computed once per checkpoint into the kvgen cache, and packed at every load:
    on Gemma 3 270M ~0.5 s more load for ~7 ms less a token, so it pays past ~80 greedy tokens.

    `gguf_blocks` (a GGUF file, fast path, CPU) keeps the file's quantized weights beside the
    dequantized ones, as int8 with a scale per group (`kvgen.loading.blocks`): compiled decode steps
    of one row read those, the file's exact values in fewer bytes; every other step reads the
    dequantized weights. Gemma 3 270M: ~0.4 GB more memory; a compiled step reads 306 MB instead of
    536 and runs ~1.05-1.1x faster.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    start = time.perf_counter()
    dtype = resolve_dtype(dtype, device)
    source = default_model() if model is None else model
    folder = resolve_model(source, dtype)  # first: a missing model is its own error
    if gguf_blocks:
        _check_gguf_blocks(source, device, backend, fast, screen_head)
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as e:
        raise ValueError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    return_freed_memory()
    if backend == "hf":
        from .hf import load_hf

        net = load_hf(folder, dtype, device)
    else:
        net = load_native(folder, dtype, device)
        if gguf_blocks:
            attach_blocks(net, Path(source).expanduser())
        if fast:
            store = screen_store(folder, dtype) if screen_head else None
            speed_up(net, pack_weights=packing_pays(dtype, device), screen_head=screen_head, store=store)
            return_freed_memory()  # the scratch copies that fusing and packing freed
    return LM(net, tokenizer, backend, folder, _eos_token_ids(folder, tokenizer), time.perf_counter() - start)
