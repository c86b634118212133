"""How a loaded model runs, chosen once at load; the generation loop never knows.

`prepare` settles the weights' format: a GGUF's quantized matrices stay 4-8-bit on torch's
weight-only kernels (`kvgen.quant`), or kvgen's own int4 kernel (`kvgen.kernels`), where this
machine runs those faster than float ones (measured once per processor, `kvgen.loading.dtype`); a
float checkpoint can be quantized the same way. Then sibling projections are fused and float
weights prepacked where that pays (`kvgen.fast`), rotary layers attend with kvgen's attention
kernel where this CPU builds it, and on a CPU each layer's pure steps run compiled for this
machine where that was measured faster (`kvgen.compiled`). The `Runner` it
returns hands the loop its decode step (`generate.generate_tokens(..., decoder=...)`):
on a GPU with the static cache, one recorded as a CUDA graph and replayed (`kvgen.graphs`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from . import compiled, fast, graphs, kernels
from .cache import LayerCache
from .generate import Decode, plain_decoder
from .loading import release_file_pages, return_freed_memory, save_tensors, weight_files
from .loading.blocks import block_tensors, blocks_layout, read_blocks
from .loading.convert import cache_root, content_key
from .loading.dtype import int4_kernel, packing_pays, quantized_pays
from .models.layers import RotaryAttention
from .quant import KINDS, QuantLinear, quantize_linears, swap_in, use_kernel

QUANTIZE = ("auto", "none", *KINDS)


class Runner:
    """Builds a model's decode step for the loop: plain, or replayed as a CUDA graph."""

    def __init__(self, quantized: str | None = None, compiled: str = "not compiled") -> None:
        self.quantized = quantized  # "gguf", "int4", "int8" or None: what the weights are
        self.compiled = compiled  # whether the layers' pure steps run compiled (`kvgen.compiled`), or why not

    def decoder(self, model: nn.Module, cache: list[LayerCache], batch: int) -> Decode:
        """The decode step over `cache` for `batch` rows, as `generate.generate_tokens` calls it."""
        decode = plain_decoder(model, cache, batch)
        device = next(model.parameters()).device
        if graphs.can_record(cache, device):
            return graphs.GraphDecoder(decode, batch, device, graph=graphs.CudaGraph)
        return decode


def quantized_store(folder: Path, kind: str, dtype: torch.dtype) -> Path:
    """Where the float checkpoint in `folder`, quantized to `kind` for `dtype`, is kept: the kvgen
    cache, by the weight files' content."""
    key = hashlib.sha256(" ".join(content_key(f) for f in sorted(weight_files(folder))).encode()).hexdigest()[:20]
    return (
        cache_root() / "quantized" / f"{key}-{kind}-{str(dtype).removeprefix('torch.')}-{blocks_layout()}.safetensors"
    )


def stored(store: Path, make) -> dict[str, QuantLinear]:
    """QuantLinears by name from the safetensors `store` (memory-mapped); where it is missing or
    unreadable, `make()` them and store them (a store we cannot write only means making them again)."""
    try:
        return read_blocks(store)
    except Exception:  # missing, or unreadable: made again
        made = make()
        save_tensors(store, block_tensors(made))
        return made


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of: {', '.join(QUANTIZE)}")


def keeps_blocks(quantize: str, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a GGUF loaded with `quantize` keeps its quantized matrices quantized: "int4" and
    "int8" always (on a CPU: torch's kernels for these layouts are CPU ones), "auto" where this
    CPU runs those kernels faster than float ones (measured once per processor)."""
    check_quantize(quantize)
    _check_on_cpu(quantize, device)
    return quantize in KINDS or (quantize == "auto" and quantized_pays(dtype, device))


def _check_on_cpu(quantize: str, device: torch.device | str) -> None:
    if quantize in KINDS and torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on torch's CPU kernels only; this model is on {device}")


def use_attention_kernel(model: nn.Module, device: torch.device | str) -> bool:
    """Let a CPU model's rotary layers attend with kvgen's kernel where this CPU can build it:
    one call a step for every row (SDPA takes one a row), each row's numbers its own."""
    usable = torch.device(device).type == "cpu" and kernels.load("attention") is None
    for module in model.modules():
        if isinstance(module, RotaryAttention):
            module.kernel = usable
    return usable


def prepare(model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device | str, quantize: str) -> Runner:
    """Give a freshly loaded model (from `folder`) its fast weights, in place, and return its runner.

    `quantize`: "auto" takes the weights as loaded (a GGUF's quantized matrices stay quantized where
    `keeps_blocks` said so); "int4" or "int8" quantizes a float checkpoint's weights (kept in the
    kvgen cache: `kvgen convert --quantize` makes them ahead); "none" is the float reference path:
    plain modules, the dequantized weights, nothing fused or packed.
    """
    check_quantize(quantize)
    if quantize == "none":
        return Runner()
    quantized = "gguf" if any(isinstance(m, QuantLinear) for m in model.modules()) else None  # kept blocks
    if quantized is None and quantize in KINDS:
        _check_on_cpu(quantize, device)
        swap_in(model, stored(quantized_store(folder, quantize, dtype), lambda: quantize_linears(model, quantize)))
        quantized = quantize
    if quantized is not None:  # before fusing: fused products join tensors laid out for their kernel
        release_file_pages(use_kernel(model, int4_kernel(dtype, device)))
    fast.speed_up(model, pack_weights=packing_pays(dtype, device))
    use_attention_kernel(model, device)
    return_freed_memory()  # the scratch copies that fusing and packing freed
    return Runner(quantized, compiled.speed_up(model))
