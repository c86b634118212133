"""A GGUF's quantized weights as the compiled decode step reads them: int8 values with a float32
scale, and for some types an offset, per group of 16 or 32 columns (`Blocks`).

kvgen dequantizes a GGUF once, into float32 or bfloat16, and every eager step streams those
weights. llama.cpp streams the file's own blocks instead: 4.5 to 8.5 bits a weight in Gemma 3
270M's Q4_K_M file, against bfloat16's 16. The blocks here hold the same values in the form a
compiled step streams fastest (`kvgen.fast.linear`): q · scale - offset is what
`gguf.quants.dequantize` computes, operation for operation, so a product over them equals the
float32 product over the dequantized weights up to the order of its additions.

Why int8 and not the file's 4- and 5-bit fields as they are: inductor turns a multiply-and-sum
over int8 rows with a scale per group into a vectorized loop (Gemma 3 270M's 262k-row LM head in
7.0 ms, against 10.4 ms for its bfloat16 rows), but not one that unpacks nibbles (the layers'
products in 25 ms, against 5.8 ms from int8). Measured on a 2-core EPYC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

# A decoder: (n, bytes per block) uint8 -> q (n, values per block) int8, scale (n, groups) and
# offset (n, groups) or None, float32. Each one follows gguf.quants' dequantize_blocks.
Decoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


class Blocks(nn.Module):
    """A weight (out, in) as w = q · scale - offset, with one scale and offset per `group` columns.

    `q` is int8 (out, in); `scale` and `offset` are float32 (out, in / group); no offset means 0.
    The tensors are buffers never saved: a checkpoint keeps its own weights.
    """

    def __init__(self, q: Tensor, scale: Tensor, offset: Tensor | None) -> None:
        super().__init__()
        self.group = q.shape[1] // scale.shape[1]
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("offset", offset, persistent=False)

    def weight(self) -> Tensor:
        """The float32 weight these blocks hold."""
        w = self.q.float() * self.scale.repeat_interleave(self.group, dim=1)
        return w if self.offset is None else w - self.offset.repeat_interleave(self.group, dim=1)

    def product(self, x: Tensor) -> Tensor:
        """x (..., in) times the weight's transpose, summed in float32 -> (..., out) float32.

        Written as one multiply-and-sum over each row, the scale indexed per column: inductor
        makes of it a single vectorized loop over the int8 rows (a sum per group first, then one
        over the groups, is two loops and ran 4x slower)."""
        return (x[..., None, :].float() * self.weight()).sum(-1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @staticmethod
    def join(parts: list[Blocks | None]) -> Blocks | None:
        """The blocks of weights stacked by rows (a fused projection's), or None if one has none."""
        if not parts or any(p is None for p in parts):
            return None
        group = min(p.group for p in parts)  # a larger group's scales repeat exactly into smaller ones
        scales = [p.scale.repeat_interleave(p.group // group, dim=1) for p in parts]
        offset = None
        if any(p.offset is not None for p in parts):
            offsets = [p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts]
            offset = torch.cat([o.repeat_interleave(p.group // group, dim=1) for o, p in zip(offsets, parts)])
        return Blocks(torch.cat([p.q for p in parts]), torch.cat(scales), offset)


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


def decode(type_name: str, data: np.ndarray, rows: int) -> Blocks:
    """A GGUF tensor's raw bytes (`rows` rows of whole blocks) of type `type_name` -> its Blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]
    q, scale, offset = DECODERS[type_name](np.asarray(data).reshape(-1, block_bytes))
    as_rows = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))  # noqa: E731
    return Blocks(as_rows(q), as_rows(scale), None if offset is None else as_rows(offset))


STORE_VERSION = 1  # bump when what `decode` writes changes, so old stores are decoded again


def store_path(path: Path) -> Path:
    """Where the decoded blocks of the GGUF at `path` are kept: the kvgen cache, by the file's content."""
    from .convert import cache_root, content_key

    return cache_root() / "gguf-blocks" / f"{content_key(path)}-v{STORE_VERSION}.safetensors"


def decode_file(path: Path) -> dict[str, Tensor]:
    """Every weight of the GGUF at `path` stored in a type of `DECODERS` -> "{name}.q", "{name}.scale"
    and "{name}.offset" tensors, under transformers' names, in the rows the model uses. GPT-2's
    projections are stored transposed against their products' rows: they are left out."""
    from gguf import GGMLQuantizationType

    from .gguf import GGUFFile, config_from_gguf, tensor_plan

    g = GGUFFile(path)  # reading its metadata takes seconds (a 262k-token vocabulary): hence the store
    out = {}
    for item in tensor_plan(g, config_from_gguf(g)):
        type_name = GGMLQuantizationType(item.source.tensor_type).name
        if type_name not in DECODERS or len(item.shape) != 2 or (g.architecture == "gpt2" and item.fix is not None):
            continue
        blocks = decode(type_name, item.source.data, item.shape[0])
        for part in ("q", "scale", "offset"):
            if (t := getattr(blocks, part)) is not None:
                out[f"{item.name}.{part}"] = item.fix(t) if item.fix is not None else t  # Llama's q/k row order
    return out


def read_blocks(path: Path) -> dict[str, Blocks]:
    """The GGUF's decodable weights as Blocks, by name: from the store, else decoded (then stored)."""
    from safetensors.torch import load_file

    from . import save_tensors

    store = store_path(path)
    try:
        tensors = load_file(store)
    except Exception:  # missing, or unreadable: decoded again
        tensors = decode_file(path)
        save_tensors(store, tensors)  # a store we cannot write only means decoding again next time
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {n: Blocks(tensors[f"{n}.q"], tensors[f"{n}.scale"], tensors.get(f"{n}.offset")) for n in names}


def attach_blocks(model: nn.Module, path: Path) -> int:
    """Give each `nn.Linear` of `model` (loaded from the GGUF at `path`) whose weight the file stores
    in a type of `DECODERS` its `blocks`; a tied LM head gets the embedding's. Returns how many."""

    def where(t: Tensor) -> tuple:  # a tied head is another Parameter over the embedding's memory
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)

    by_weight: dict[tuple, list[nn.Linear]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            by_weight.setdefault(where(module.weight), []).append(module)
    params = dict(model.named_parameters(remove_duplicate=False))
    attached = 0
    for name, blocks in read_blocks(path).items():
        for linear in by_weight.get(where(params[name]), []) if name in params else []:
            if tuple(linear.weight.shape) == tuple(blocks.q.shape):
                linear.blocks = blocks
                attached += 1
    return attached
