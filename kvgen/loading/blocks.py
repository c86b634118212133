"""A GGUF's quantized weights as kvgen keeps them in memory: `kvgen.quant.QuantLinear`s.

Each type's blocks are first decoded to int8 values q with a float32 scale, and for some types an
offset, per group of 16 or 32 columns, following gguf.quants' dequantize_blocks: w = q * scale -
offset. Every type with groups of 32 then keeps its values exactly as int4 groups, 5-bit ones
with a plane of their high bits and 8-bit ones as two int4 terms (`kvgen.quant`); Q6_K's groups
of 16 are re-quantized to 7 bits in groups of 32. Decoding
a file takes seconds (numpy, and GGUF metadata with a 262k-token vocabulary), so the result is
kept in the GGUF's folder in the kvgen cache (`kvgen.loading.convert`), in `BLOCKS_FILE`, beside
the tensors that stay float: no float copy of a quantized matrix is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..quant import BLOCK_ROWS, GROUP, QuantLinear, fits_int4, int4_available
from .gguf import ROWS_PER_CHUNK_ELEMENTS

BLOCKS_FILE = "kvgen_blocks.safetensors"
STORE_VERSION = 6  # bump when what `to_quant` makes changes, so kept weights are made again

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


# The bits each type's values are kept in: at least as many as they span, and the same for every
# band of rows of one weight, made apart, so that the bands join.
BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
# Q6_K's groups of 16 each have their own scale: in groups of 32 they are re-quantized. 7 bits (8 a
# weight with the scales, not 9) keep the KL divergence close to 8 bits'; 6 more than double it
# (docs/speed.md).
REQUANTIZED_BITS = 7


def to_quant(type_name: str, data: np.ndarray, shape: tuple[int, int], dtype: torch.dtype, fix=None) -> QuantLinear:
    """One GGUF weight of `shape` -> a QuantLinear computing in `dtype`. Types with groups of 32
    (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0) keep their values exactly, in `BITS`; Q6_K's groups
    of 16 are re-quantized to 7 bits in groups of 32; a shape the int4 layout cannot hold becomes
    int8 rows. `fix` reorders rows (Llama's q and k).

    A large weight goes a band of rows at a time (each row's values are its own), so decoding a
    151936-row embedding holds ~16M values of scratch, not the whole table's int32 copies."""
    rows, columns = shape
    step = max(BLOCK_ROWS, ROWS_PER_CHUNK_ELEMENTS // columns // BLOCK_ROWS * BLOCK_ROWS)
    if fix is not None or rows <= step:
        return _rows_to_quant(type_name, data, shape, dtype, fix or (lambda t: t))
    parts = [
        _rows_to_quant(type_name, data[start : start + step], (min(step, rows - start), columns), dtype, lambda t: t)
        for start in range(0, rows, step)
    ]
    return QuantLinear.join(parts)


def _rows_to_quant(type_name: str, data: np.ndarray, shape: tuple[int, int], dtype: torch.dtype, fix) -> QuantLinear:
    q, scale, offset = decode(type_name, data, shape[0])
    if not fits_int4(*shape):
        return QuantLinear.quantize(fix(dequantize(q, scale, offset)), "int8", dtype)
    if q.shape[1] // scale.shape[1] != GROUP:
        return QuantLinear.quantize(fix(dequantize(q, scale, offset)), "int4", dtype, bits=REQUANTIZED_BITS)
    low = int(q.min())
    zero = low * scale - (0 if offset is None else offset)  # w = q * scale - offset = (q - low) * scale + zero
    return QuantLinear.groups(fix(q.to(torch.int16) - low), fix(scale), fix(zero), dtype, BITS[type_name])


def keeps_quantized(g, item) -> bool:
    """Whether a GGUF tensor (a `TensorPlan` of `g`) stays quantized in memory: a matrix in a type
    of `DECODERS`. GPT-2's projections are stored transposed against their products' rows: they are
    left out (kept as floats)."""
    from gguf import GGMLQuantizationType

    type_name = GGMLQuantizationType(item.source.tensor_type).name
    transposed = g.architecture == "gpt2" and item.fix is not None
    return type_name in DECODERS and len(item.shape) == 2 and not transposed


def quantize_plan(plan: list, dtype: torch.dtype, advance=lambda n: None) -> dict[str, QuantLinear]:
    """Each tensor of `plan` (`TensorPlan`s that `keeps_quantized`) -> its QuantLinear computing in
    `dtype`, under transformers' names, in the rows the model uses."""
    from gguf import GGMLQuantizationType

    out = {}
    for item in plan:
        type_name = GGMLQuantizationType(item.source.tensor_type).name
        out[item.name] = to_quant(type_name, item.source.data, tuple(item.shape), dtype, item.fix)
        advance(item.nbytes_in_file)
    return out


def block_tensors(blocks: dict[str, QuantLinear]) -> dict[str, Tensor]:
    """QuantLinears by name -> their tensors by `name.part`, as `read_blocks` reads them back."""
    return {f"{name}.{k}": t for name, m in blocks.items() for k, t in m.state_dict().items()}


def read_blocks(path: Path) -> dict[str, QuantLinear]:
    """The QuantLinears whose `block_tensors` a safetensors file holds, memory-mapped; raises on a
    missing or damaged file."""
    from safetensors.torch import load_file

    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in load_file(path).items():
        name, part = key.rsplit(".", 1)
        parts.setdefault(name, {})[part] = t
    return {name: QuantLinear("int4" if "packed" in p else "int8", p) for name, p in parts.items()}


def blocks_layout() -> str:
    """What a kept GGUF's matrices become on this torch: part of the cache's names, so that a torch
    with another layout (no int4 kernel) makes them again."""
    return f"{'int4' if int4_available() else 'int8'}-v{STORE_VERSION}"
