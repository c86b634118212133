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
from .loading import default_model, load_native, model_source, read_config, resolve_model, return_freed_memory
from .loading.dtype import resolve_dtype
from .loading.gguf import is_gguf
from .loading.tokenizer import load_tokenizer
from .quant import KINDS
from .runner import check_quantize, keeps_blocks, prepare
from .sampling import SamplingParams

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


def _checked_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a one-line ValueError: unknown, or CUDA where there is none."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if checked.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r}: {why} (torch {torch.__version__})")
    return checked


def plan_load(
    model: str | Path | None, dtype: str | torch.dtype, device: str | torch.device, backend: str, quantize: str
) -> tuple[str | Path, torch.dtype, torch.device, bool]:
    """What `load` will load, before anything is: the model's source, the dtype and device, and
    whether a GGUF's quantized matrices stay quantized (`kvgen.runner.keeps_blocks`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    check_quantize(quantize)
    device = _checked_device(device)
    if backend == "hf" and quantize in KINDS:
        raise ValueError(f"quantize={quantize!r} needs the native backend: transformers runs the float weights")
    source = model_source(default_model() if model is None else model)  # a known name: its GGUF
    native, gguf = backend == "native", is_gguf(source)
    dtype = resolve_dtype(dtype, device, quantized=native and (quantize in KINDS or (quantize == "auto" and gguf)))
    return source, dtype, device, native and gguf and keeps_blocks(quantize, dtype, device)


def load(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    backend: str = "native",
    quantize: str = "auto",
) -> LM:
    """Load a model folder (config.json, safetensors or pytorch_model.bin, tokenizer files), a GGUF
    file or a hub id already in the local Hugging Face cache. Without `model`, the embedded
    default: Gemma 3 270M (base, Q4_K_M GGUF).

    `dtype="auto"` computes in whichever of float32 and bfloat16 runs faster on this machine, for
    the weights' kernels (measured once per processor; bfloat16 on a GPU).

    `quantize` (native backend) chooses the weights: "auto" keeps a GGUF's 4-8-bit weights as
    they are in memory, on torch's int4/int8 kernels (`kvgen.quant`), wherever this CPU runs those
    faster; "int4" or "int8" quantizes a float checkpoint's weights the same way; "none" is the
    float reference path: the weights dequantized to `dtype`, plain modules, nothing fused.

    `backend="hf"` runs transformers' `generate()` on the same (float) weights, behind the same API.
    """
    start = time.perf_counter()
    source, dtype, device, keep_blocks = plan_load(model, dtype, device, backend, quantize)
    folder = resolve_model(source, dtype, keep_blocks)
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as e:
        raise ValueError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    return_freed_memory()
    runner = None
    if backend == "hf":
        from .hf import load_hf

        net = load_hf(folder, dtype, device)
    else:
        net = load_native(folder, dtype, device)
        runner = prepare(net, folder, dtype, device, quantize)
    eos = _eos_token_ids(folder, tokenizer)
    return LM(net, tokenizer, backend, folder, eos, time.perf_counter() - start, runner)
