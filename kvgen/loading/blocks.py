"""A GGUF's quantized weights as kvgen keeps them in memory: `kvgen.quant.QuantLinear`s.

Each type's blocks are first decoded to int8 values q with a float32 scale, and for some types an
offset, per group of 16 or 32 columns, following gguf.quants' dequantize_blocks: w = q * scale -
offset. Every type with groups of 32 then keeps its values exactly as int4 groups, 5- to 8-bit
ones as two int4 terms (`kvgen.quant`); Q6_K is re-quantized to 8 bits in groups of 32. Decoding
a file takes seconds (numpy, and GGUF metadata with a 262k-token vocabulary), so the result is
kept in the kvgen cache, like a conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..quant import GROUP, QuantLinear, fits_int4, int4_available

# A decoder: (n, bytes per block) uint8 -> q (n, values per block) int8, scale (n, groups) and
# offset (n, groups) or None, float32. Each one follows gguf.quants' dequantize_blocks.
Decoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32, from the float16 they hold."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): the low nibbles, then the high ones (the 32-value types' order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes, a little-endian 32-bit word per block -> (n, 32): each value's bit 4."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins for 8 groups -> (n, 8) each, as float32."""
    s = b.reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    scales = np.concatenate([lo & 63, (hi & 15) | ((lo >> 2) & 48)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes -> (n, 256): each 32 bytes hold one group in low nibbles, the next in high."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 15, chunks >> 4], axis=2).reshape(-1, 256)


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None


def _q4_0(b):
    return _nibbles(b[:, 2:]).astype(np.int8) - 8, _f16(b[:, :2]), None


def _q4_1(b):
    return _nibbles(b[:, 4:]).astype(np.int8), _f16(b[:, :2]), -_f16(b[:, 2:4])


def _q5_0(b):
    return (_nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).astype(np.int8) - 16, _f16(b[:, :2]), None


def _q5_1(b):
    return (_nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])).astype(np.int8), _f16(b[:, :2]), -_f16(b[:, 2:4])


def _q4_k(b):
    scales, mins = _k_scales(b[:, 4:16])
    return _k_low_nibbles(b[:, 16:]).astype(np.int8), _f16(b[:, :2]) * scales, _f16(b[:, 2:4]) * mins


def _q5_k(b):
    scales, mins = _k_scales(b[:, 4:16])
    high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # bit g: group g's
    q = _k_low_nibbles(b[:, 48:]) | (high.reshape(-1, 256) << 4)
    return q.astype(np.int8), _f16(b[:, :2]) * scales, _f16(b[:, 2:4]) * mins


def _q6_k(b):
    low = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]  # per half: 2 x 64
    high = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]  # per half: 4 x 32
    q = ((low & 15).reshape(-1, 256) | ((high & 3).reshape(-1, 256) << 4)).astype(np.int8) - 32
    return q, _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32), None


DECODERS: dict[str, Decoder] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def decode(type_name: str, data: np.ndarray, rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """A GGUF tensor's raw bytes (`rows` rows of whole blocks) -> q (rows, K), scale and offset (rows, groups)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]
    q, scale, offset = DECODERS[type_name](np.asarray(data).reshape(-1, block_bytes))
    as_rows = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))  # noqa: E731
    return as_rows(q), as_rows(scale), None if offset is None else as_rows(offset)


def dequantize(q: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """The float32 (rows, K) weight that `decode`'s parts hold."""
    group = q.shape[1] // scale.shape[1]
    w = q.float() * scale.repeat_interleave(group, dim=1)
    return w if offset is None else w - offset.repeat_interleave(group, dim=1)


def to_quant(type_name: str, data: np.ndarray, shape: tuple[int, int], dtype: torch.dtype, fix=None) -> QuantLinear:
    """One GGUF weight of `shape` -> a QuantLinear computing in `dtype`. Types with groups of 32
    (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0) keep their values exactly, as one int4 term (4-bit)
    or two (5- to 8-bit); Q6_K's groups of 16 are re-quantized to 8 bits in groups of 32; a shape
    the int4 layout cannot hold becomes int8 rows. `fix` reorders rows (Llama's q and k)."""
    fix = fix or (lambda t: t)
    q, scale, offset = decode(type_name, data, shape[0])
    if not fits_int4(*shape):
        return QuantLinear.quantize(fix(dequantize(q, scale, offset)), "int8", dtype)
    if q.shape[1] // scale.shape[1] != GROUP:
        return QuantLinear.quantize(fix(dequantize(q, scale, offset)), "int4", dtype, bits=8)
    low = int(q.min())
    zero = low * scale - (0 if offset is None else offset)  # w = q * scale - offset = (q - low) * scale + zero
    return QuantLinear.groups(fix(q.to(torch.int16) - low), fix(scale), fix(zero), dtype)


STORE_VERSION = 4  # bump when what `quantize_file` writes changes, so old stores are made again


def store_path(path: Path, dtype: torch.dtype) -> Path:
    """Where the quantized weights of the GGUF at `path` are kept: the kvgen cache, by the file's content."""
    from .convert import cache_root, content_key

    layout = "int4" if int4_available() else "int8"
    name = f"{content_key(path)}-{str(dtype).removeprefix('torch.')}-{layout}-v{STORE_VERSION}.safetensors"
    return cache_root() / "quantized" / name


def quantize_file(path: Path, dtype: torch.dtype) -> dict[str, QuantLinear]:
    """Every weight of the GGUF at `path` stored in a type of `DECODERS` -> its QuantLinear, under
    transformers' names, in the rows the model uses. GPT-2's projections are stored transposed
    against their products' rows: they are left out (kept as floats)."""
    from gguf import GGMLQuantizationType

    from .gguf import GGUFFile, config_from_gguf, tensor_plan

    g = GGUFFile(path)
    out = {}
    for item in tensor_plan(g, config_from_gguf(g)):
        type_name = GGMLQuantizationType(item.source.tensor_type).name
        if type_name not in DECODERS or len(item.shape) != 2 or (g.architecture == "gpt2" and item.fix is not None):
            continue
        out[item.name] = to_quant(type_name, item.source.data, tuple(item.shape), dtype, item.fix)
    return out


def read_quantized(path: Path, dtype: torch.dtype) -> dict[str, QuantLinear]:
    """The GGUF's quantized weights by name: from the store (memory-mapped), else made (then stored)."""
    return stored(store_path(path, dtype), lambda: quantize_file(path, dtype))


def stored(store: Path, make) -> dict[str, QuantLinear]:
    """QuantLinears by name from the safetensors `store` (memory-mapped); where it is missing or
    unreadable, `make()` them and store them (a store we cannot write only means making them again)."""
    from safetensors.torch import load_file

    from . import save_tensors

    try:
        tensors = load_file(store)
    except Exception:  # missing, or unreadable: made again
        made = make()
        save_tensors(store, {f"{name}.{k}": t for name, m in made.items() for k, t in m.state_dict().items()})
        return made
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, part = key.rsplit(".", 1)
        parts.setdefault(name, {})[part] = t
    return {name: QuantLinear("int4" if "packed" in p else "int8", p) for name, p in parts.items()}


def checkpoint_store_path(weight_files: list[Path], kind: str, dtype: torch.dtype) -> Path:
    """Where a float checkpoint's weights quantized to `kind` are kept, by the files' content."""
    import hashlib

    from .convert import cache_root, content_key

    key = hashlib.sha256(" ".join(content_key(f) for f in sorted(weight_files)).encode()).hexdigest()[:20]
    layout = "int4" if int4_available() else "int8"
    name = f"{key}-{kind}-{str(dtype).removeprefix('torch.')}-{layout}-v{STORE_VERSION}.safetensors"
    return cache_root() / "quantized" / name
