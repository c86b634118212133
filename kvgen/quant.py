"""Weights kept 4- or 8-bit in memory, multiplied by torch's own weight-only kernels.

A decode step of one row streams every weight once, so its speed is the weights' bytes. A GGUF's
4-6-bit blocks dequantized to bfloat16 cost 2-3.5x the file's bytes a token; here they stay small:

- **int4**, torch's tinygemm CPU kernel (`aten._weight_int4pack_mm_for_cpu`): 4-bit values in
  groups of 32 along a row, each group w = (u - 8) * scale + zero. Q4_0, Q4_1 and Q4_K are exactly
  this (their groups are 32 wide; zero absorbs their offsets). Wider values in groups of 32 (Q5_0,
  Q5_1, Q5_K, Q8_0) are two such terms, 16 * scale * (v >> 4) + scale * (v & 15): exact again, and
  on the CPUs measured the int4 kernel streams these 10 bits a weight faster than the int8 kernel
  streams 8 (docs/speed.md). Q6_K's groups of 16 are re-quantized to 7 bits in groups of 32.
- **int8**, `aten._weight_int8pack_mm`: w = q * scale with one scale per row, for a float
  checkpoint quantized at load (`quantize="int8"`) and for shapes the int4 layout cannot hold.

torch's int4 kernel is bound by its arithmetic, not by memory; where this CPU builds kvgen's own
(`kvgen.kernels`, AVX-512 BF16) and it was measured faster, the runner hands the int4 weights to
it (`use_kernel`): the same nibbles, one scale and zero a group (an 8-bit value's two terms
share theirs; a symmetric type's scale alone), laid out by blocks of rows. 5- to 7-bit values are
kept as that kernel reads them, their low nibbles and a plane of their 1 to 3 high bits
(`pack_high`): 6 to 8 bits a weight with the scales, not 9; torch's kernel takes them as two
terms, unpacked when it is chosen.

The kernels compute a row's product the same way however many rows a step has, so one sequence's
greedy tokens do not depend on its batch. They pay for few rows per weight (decode, a prompt's last
position); a prompt's many positions instead dequantize a band of weight rows at a time into the
compute dtype and run the ordinary matrix product, faster there (with kvgen's kernel, its library
dequantizes a band in one pass). Figures: docs/speed.md.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

GROUP = 32  # values per int4 scale: the 4-bit GGUF types' own group
BLOCK_ROWS = 64  # rows the CPU int4 layout interleaves: 32 in the low nibbles, the next 32 in the high
BAND_BYTES = 16 << 20  # a prompt's product dequantizes this many bytes of weights at a time
KINDS = ("int4", "int8")
# What a group's values are centred on, by their bits: w = (v - middle) * scale + zero. Two terms'
# (8 bits) is torch's, each term u - 8: 16 * 8 + 8.
MIDDLE = {4: 8, 5: 16, 6: 32, 7: 64, 8: 136}


def symmetric_zero(bits: int) -> int:
    """A symmetric type's zero, in units of its scale: w = 0 at v = 2**(bits - 1) (Q4_0, Q5_0 and
    Q8_0 values, centred so by `QuantLinear.groups`). kvgen's kernel reads such a weight's scales
    alone: half a bit a weight less."""
    return MIDDLE[bits] - 2 ** (bits - 1)


# Up to this many positions per sequence go through the kernels: decode steps, a prompt's last
# position, speculative verification. The choice depends on a sequence's own positions, never on
# how many sequences share the step, so a row's result does not depend on its batch.
KERNEL_POSITIONS = 8


_scratch = threading.local()  # per thread: two threads' prompts must not share a buffer


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A buffer of `shape` kept between calls under `name`, grown as needed: what a band of
    dequantized weights is written into. Its contents are the caller's until the next call."""
    numel = math.prod(shape)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        with torch.inference_mode(False):  # one made in inference mode could not be written outside it
            buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:numel].view(shape)


def pack_int4(u: Tensor) -> Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8 in the CPU int4 kernel's layout: for each block of 64
    rows and each column, 32 bytes whose low nibble is row j's value and high nibble row j + 32's."""
    n, k = u.shape
    rows = u.to(torch.uint8).view(n // BLOCK_ROWS, BLOCK_ROWS, k).transpose(1, 2)  # (N/64, K, 64)
    half = BLOCK_ROWS // 2
    return (rows[..., :half] | (rows[..., half:] << 4)).contiguous().view(n, k // 2)


def pack_high(h: Tensor, bits: int) -> Tensor:
    """(N, K) values below 2**bits (1 to 3 bits: a 5- to 7-bit value's part above its nibble) ->
    (N, K * bits / 8) uint8, as kvgen's kernel reads them: for each block of 64 rows, each pair of
    columns and each bit, four 32-bit masks; mask i's bit 2m + c is that bit of row 16i + m, column c."""
    n, k = h.shape
    blocks = n // BLOCK_ROWS
    spread = h.to(torch.uint8).view(blocks, 4, 16, k // 2, 2).permute(0, 3, 1, 2, 4)  # (N/64, K/2, i, m, c)
    out = torch.empty(blocks, k // 2, bits, 4, 4, dtype=torch.uint8)
    weights = 1 << torch.arange(8, dtype=torch.uint8)  # lane half 2m + c: byte (2m + c) // 8, its bit
    for b in range(bits):
        out[:, :, b] = (((spread >> b) & 1).reshape(blocks, k // 2, 4, 4, 8) * weights).sum(-1, dtype=torch.uint8)
    return out.view(n, k * bits // 8)


def high_values(plane: Tensor, bits: int, rows: Tensor | None = None) -> Tensor:
    """`pack_high`'s plane (n, K * bits / 8) -> its (n, K) values as uint8, or only those of `rows`
    (any ids: (len(rows), K))."""
    n, k = plane.shape[0], plane.shape[1] * 8 // bits
    masks = plane.view(n // BLOCK_ROWS, k // 2, bits, 4, 4)  # (N/64, K/2, bit, i, byte of the mask)
    if rows is None:  # every row: mask i's bit 2m + c is row 16i + m's, column c's
        set_ = (masks[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (N/64, K/2, bit, i, 4, 8)
        v = set_[:, :, 0]
        for b in range(1, bits):
            v |= set_[:, :, b] << b
        return v.view(n // BLOCK_ROWS, k // 2, 4, 16, 2).permute(0, 2, 3, 1, 4).reshape(n, k)
    within = rows % BLOCK_ROWS  # row 16i + m: bit 2m + c of mask i is bit 2 (m % 4) + c of its byte m // 4
    m = within % 16
    bytes_ = masks[rows // BLOCK_ROWS, :, :, within // 16, m // 4]  # (rows, K/2, bit)
    shift = (2 * (m % 4)).view(-1, 1, 1, 1) + torch.arange(2)  # (rows, 1, 1, c)
    v = ((bytes_[..., None] >> shift) & 1) << torch.arange(bits).view(bits, 1)  # (rows, K/2, bit, c)
    return v.sum(2).reshape(len(rows), k).to(torch.uint8)


@functools.cache
def int4_available() -> bool:
    """Whether this torch build has the CPU int4 kernel and packs it as `pack_int4` does (checked on
    a probe: the layout is the kernel's business, and it could change with a build)."""
    try:
        u = torch.randint(
            0, 16, (2 * BLOCK_ROWS, 2 * GROUP), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
        )
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    except (AttributeError, RuntimeError):
        return False
    return theirs.dtype == torch.uint8 and torch.equal(theirs, pack_int4(u))


def fits_int4(out_features: int, in_features: int) -> bool:
    return out_features % BLOCK_ROWS == 0 and in_features % GROUP == 0 and int4_available()


class QuantLinear(nn.Module):
    """A linear map whose weight is int4 groups of 32 (one or two terms, or one and a plane of high
    bits) or int8 rows; see the module doc.

    int4 holds `packed` (terms, N, K/2) uint8 and `scales_zeros` (terms, K/32, N, 2); the weight is
    the terms' sum, each (u - 8) * scale + zero. With `high` (N, K * bits / 8, `pack_high`) the one
    term's nibbles are the low bits of 5- to 7-bit values v, w = (v - middle) * scale + zero
    (`MIDDLE`). int8 holds `q` (N, K) int8 and `scale` (N,).
    Scales are in the compute dtype, as the kernels require. `kernel` says whose int4 kernel
    multiplies a few rows: torch's, or kvgen's own (`kvgen.kernels`) where the runner measured it
    faster on this machine (`use_kernel`); kvgen's reads one scale and zero a group, block by block,
    (1, N/64, K/32, 64, 2), so that a block's rows read theirs from one place.
    """

    kernel = "torch"

    def __init__(self, kind: str, tensors: dict[str, Tensor], bias: Tensor | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown quantization {kind!r}; choose one of: {', '.join(KINDS)}")
        self.kind = kind
        for name, t in tensors.items():
            self.register_buffer(name, t)
        if "high" not in tensors:
            self.register_buffer("high", None)
        self.register_buffer("bias", bias)
        if kind == "int4":
            self.out_features, self.in_features = self.packed.shape[1], self.packed.shape[2] * 2
        else:
            self.out_features, self.in_features = self.q.shape

    @property
    def bits(self) -> int:
        """Bits a value of an int4 weight: 4, 5 to 7 (one term and a plane of high bits) or 8 (two terms)."""
        if self.high is not None:
            return 4 + self.high.shape[1] * 8 // self.in_features
        return 4 * len(self.packed)

    @classmethod
    def groups(cls, v: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype, bits: int = 4) -> QuantLinear:
        """From (N, K) whole values and (N, K/32) float32 scales and zeros, w = v * scale + zero, each
        group's values spanning at most 256, kept exactly in the fewest bits, 4 to 8 (at least
        `bits`, so that weights made apart share a layout): one int4 term; one and a plane of high
        bits; or two terms, 16 * scale * (v >> 4) + scale * (v & 15)."""
        groups = v.to(torch.int32).view(v.shape[0], -1, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        span = int((high - low).max())
        bits = next(b for b in MIDDLE if b >= bits and span < 2**b)
        top, middle = 2**bits - 1, MIDDLE[bits]
        # Each group's values shifted so that w = 0 comes out near v = 2**(bits - 1), the zero near
        # `symmetric_zero`: the zero is rounded to the compute dtype as a whole, and a large one (a
        # Q5_0 group's 120 x scale) would lose bits; a symmetric type's is then that exactly.
        in_steps = torch.where(scale != 0, zero / scale, 0.0)  # an all-zero block has no scale
        shift = torch.round(in_steps + 2 ** (bits - 1)).clamp(min=-low, max=top - high).to(torch.int32)
        v = (groups + shift[..., None]).view(v.shape)
        zero = zero + (middle - shift) * scale
        if 4 < bits < 8:
            tensors = {
                "packed": pack_int4(v & 15)[None],
                "high": pack_high(v >> 4, bits - 4),
                "scales_zeros": torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype)[None].contiguous(),
            }
            return cls("int4", tensors)
        split = [(v >> 4, 16 * scale), (v & 15, scale)] if bits == 8 else [(v, scale)]
        packed, scales_zeros = [], []
        for i, (u, s) in enumerate(split):
            z = zero if i == 0 else torch.zeros_like(s)  # each term is (u - 8) * s + z
            packed.append(pack_int4(u))
            scales_zeros.append(torch.stack([s, z], dim=-1).transpose(0, 1).to(dtype))  # (K/32, N, 2)
        return cls("int4", {"packed": torch.stack(packed), "scales_zeros": torch.stack(scales_zeros).contiguous()})

    @classmethod
    def int8(cls, q: Tensor, scale: Tensor, dtype: torch.dtype) -> QuantLinear:
        """From (N, K) int8 values and (N,) scales: w = q * scale."""
        return cls("int8", {"q": q.to(torch.int8).contiguous(), "scale": scale.to(dtype).contiguous()})

    @classmethod
    def quantize(cls, weight: Tensor, kind: str, dtype: torch.dtype | None = None, bits: int = 4) -> QuantLinear:
        """Quantize a float (N, K) weight, computing in `dtype` (default: the weight's): "int4" in
        groups of 32 by each group's min and max, to `bits` (4 to 8); "int8" by each row's
        largest value."""
        w, dtype = weight.detach().float(), dtype or weight.dtype
        if kind == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            return cls.int8(torch.round(w / scale[:, None]).clamp(-127, 127), scale, dtype)
        levels = 2**bits - 1
        groups = w.view(w.shape[0], -1, GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / levels).clamp(min=1e-12)
        v = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, levels).view_as(w)
        return cls.groups(v, scale, low, dtype, bits)

    @property
    def dtype(self) -> torch.dtype:
        return (self.scales_zeros if self.kind == "int4" else self.scale).dtype

    def _scale_offset(self, scales_zeros: Tensor) -> tuple[Tensor, Tensor]:
        """(terms, K/32, n, 2) scales and zeros -> float32 (n, K/32, 1) scale and offset of the
        whole value v: two terms are one 8-bit value v = 16 * hi + lo (their scales are 16 * s and
        s, as `groups` makes them), so always w = v * s + (zero - middle * s)."""
        sz = scales_zeros.float()
        scale = sz[-1, ..., 0].t().contiguous()
        offset = (sz[0, ..., 1] - MIDDLE[self.bits] * sz[-1, ..., 0]).t().contiguous()
        return scale[..., None], offset[..., None]

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows start:stop of the weight in the compute dtype (start a multiple of 64 for int4)."""
        stop = self.out_features if stop is None else stop
        out = torch.empty(stop - start, self.in_features, dtype=self.dtype)
        for first in range(0, stop - start, self.band_rows):
            self._dequantize_into(out[first : first + self.band_rows], start + first)
        return out

    def _dequantize_into(self, out: Tensor, start: int) -> Tensor:
        """Rows start:start + len(out) of the weight, written into `out`. The steps between go
        through `scratch` buffers: a fresh tensor of a band's size costs a page fault per 4 KiB,
        which took longer than the arithmetic (docs/speed.md)."""
        n, k = out.shape
        if self.kind == "int8":
            return torch.mul(self.q[start : start + n], self.scale[start : start + n, None], out=out)
        scale, offset = self._scale_offset(self._row_scales(slice(start, start + n)))
        exact = out if out.dtype == torch.float32 else scratch("float32", (n, k), torch.float32)
        grouped = exact.view(n, -1, GROUP)
        grouped.copy_(self._values(start, n).view(n, -1, GROUP))
        torch.addcmul(offset, grouped, scale, out=grouped)  # in float32, rounded once below
        return out if exact is out else out.copy_(exact)

    def _values(self, start: int, n: int) -> Tensor:
        """Rows start:start + n's whole values v (n, K) uint8 (an int4 weight's), in a scratch buffer."""
        terms, k = len(self.packed), self.in_features
        values = scratch("values", (terms, n, k), torch.uint8)
        # Unpacking writes straight into row order: the low nibbles of a 64-row block hold its
        # first 32 rows, the high nibbles the next 32 (`pack_int4`).
        halves = values.view(terms, n // BLOCK_ROWS, 2, BLOCK_ROWS // 2, k)
        packed = self.packed[:, start : start + n].view(terms, n // BLOCK_ROWS, k, BLOCK_ROWS // 2).transpose(-1, -2)
        torch.bitwise_and(packed, 15, out=halves[:, :, 0])
        torch.bitwise_right_shift(packed, 4, out=halves[:, :, 1])
        if terms == 2:
            values[0].bitwise_left_shift_(4).bitwise_or_(values[1])
        elif self.high is not None:
            values[0].bitwise_or_(high_values(self.high[start : start + n], self.bits - 4) << 4)
        return values[0]

    def _row_scales(self, rows: slice | Tensor) -> Tensor:
        """The (terms, K/32, n, 2) scales and zeros of `rows` (a slice of whole blocks of 64, or ids),
        in either layout."""
        if self.kernel == "torch":
            return self.scales_zeros[:, :, rows]
        sz = self.scales_zeros  # (1, N/64, K/32, 64, 2), or (1, N/64, K/32, 64): the scales alone
        if isinstance(rows, slice):
            picked = sz[:, rows.start // BLOCK_ROWS : rows.stop // BLOCK_ROWS].transpose(1, 2).flatten(2, 3)
        else:
            picked = sz[:, rows // BLOCK_ROWS, :, rows % BLOCK_ROWS].movedim(0, 2)  # (1, K/32, n[, 2])
        if picked.dim() == 3:
            picked = torch.stack([picked, symmetric_zero(self.bits) * picked], dim=-1)  # exact: 0 or 8 x
        return self._per_term(picked)

    def _per_term(self, scale_zero: Tensor) -> Tensor:
        """(1, K/32, n, 2) scale and zero of each group -> each term's, as `groups` makes them: an
        8-bit value's high nibbles at 16 * scale with the zero, its low ones at scale with none."""
        if len(self.packed) == 1:
            return scale_zero
        scale, zero = scale_zero[..., 0], scale_zero[..., 1]
        high = torch.stack([16 * scale, zero], dim=-1)  # 16 * a bfloat16 scale: exact
        return torch.cat([high, torch.stack([scale, torch.zeros_like(zero)], dim=-1)])

    def set_kernel(self, kernel: str) -> list[Tensor]:
        """Multiply few rows with `kernel`, its tensors laid out as it reads them; returns those it no
        longer reads (their memory-mapped pages can go). kvgen's kernel takes one scale and zero a
        group, by blocks of 64 rows (an 8-bit value's two terms share them; a symmetric type's
        scales alone, `symmetric_zero`). torch's takes a 5- to 7-bit weight as two terms, unpacked
        here (8 bits a value in memory)."""
        if self.kind != "int4":
            return []
        unpacked = self._as_two_terms() if kernel == "torch" and self.high is not None else []
        if kernel == self.kernel:
            return unpacked
        old, groups, n = self.scales_zeros, self.in_features // GROUP, self.out_features
        if kernel == "kvgen":
            scale, zero = old[-1, ..., 0], old[0, ..., 1]  # the low term's scale, the zero
            shared = scale if torch.equal(zero, symmetric_zero(self.bits) * scale) else torch.stack([scale, zero], -1)
            blocked = shared.view(1, groups, n // BLOCK_ROWS, BLOCK_ROWS, *shared.shape[2:])
            self.scales_zeros = blocked.transpose(1, 2).contiguous()
        else:
            self.scales_zeros = self._row_scales(slice(0, n))
        self.kernel = kernel
        return [old]

    def _as_two_terms(self) -> list[Tensor]:
        """A 5- to 7-bit weight as two int4 terms of 8-bit values in torch's layout, a band of rows
        at a time; returns the tensors it held."""
        n, k, groups = self.out_features, self.in_features, self.in_features // GROUP
        packed = torch.empty(2, n, k // 2, dtype=torch.uint8)
        scales_zeros = torch.empty(2, groups, n, 2, dtype=self.dtype)
        for start in range(0, n, self.band_rows):
            rows = slice(start, min(n, start + self.band_rows))
            scale_zero = self._row_scales(rows)[0]  # (K/32, band, 2): v's scale and zero
            v = self._values(start, rows.stop - start).to(torch.int32) + MIDDLE[8] - MIDDLE[self.bits]
            packed[0, rows], packed[1, rows] = pack_int4(v >> 4), pack_int4(v & 15)
            scale, zero = scale_zero[..., 0], scale_zero[..., 1]
            scales_zeros[0, :, rows] = torch.stack([16 * scale, zero], dim=-1)  # 16 * a bfloat16: exact
            scales_zeros[1, :, rows] = torch.stack([scale, torch.zeros_like(zero)], dim=-1)
        old = [self.packed, self.high, self.scales_zeros]
        self.packed, self.high, self.scales_zeros, self.kernel = packed, None, scales_zeros, "torch"
        return old

    def rows(self, ids: Tensor) -> Tensor:
        """The weight's rows `ids` (any shape) -> (*ids.shape, K): an embedding lookup."""
        flat = ids.reshape(-1)
        if self.kernel == "kvgen":  # each row's block of 64 dequantized by the kernel: a few microseconds
            out = torch.empty(len(flat), self.in_features, dtype=self.dtype)
            block, high = scratch("row block", (self.in_features, BLOCK_ROWS), self.dtype), self._high()
            for i, row in enumerate(flat.tolist()):
                torch.ops.kvgen.int4_dequantize(self.packed, self.scales_zeros, high, row - row % BLOCK_ROWS, block)
                out[i] = block[:, row % BLOCK_ROWS]
        elif self.kind == "int8":
            out = self.q[flat].to(self.dtype) * self.scale[flat, None]
        else:
            half, block, within = BLOCK_ROWS // 2, flat // BLOCK_ROWS, flat % BLOCK_ROWS
            v = torch.zeros(len(flat), self.in_features, dtype=torch.int32)
            for packed in self.packed:  # one term, or an 8-bit value's high nibbles, then its low ones
                bytes_ = packed.view(-1, self.in_features, half)[block, :, within % half]  # (n, K)
                v = (v << 4) | torch.where((within >= half)[:, None], bytes_ >> 4, bytes_ & 15)
            if self.high is not None:
                v |= high_values(self.high, self.bits - 4, flat).to(torch.int32) << 4
            scale, offset = self._scale_offset(self._row_scales(flat))
            out = torch.addcmul(offset, v.view(len(flat), -1, GROUP).float(), scale).view(len(flat), -1).to(self.dtype)
        return out.view(*ids.shape, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2 and x.shape[-2] > KERNEL_POSITIONS:  # a prompt: many positions per sequence
            return self.banded(x)
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "kvgen":  # every term in one call
            y = torch.ops.kvgen.int4_mm(flat, self.packed, self.scales_zeros, self._high())
        elif self.kind == "int4":
            if self.high is not None:  # no kernel chosen yet: torch's reads two terms
                self.set_kernel("torch")
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed[0], GROUP, self.scales_zeros[0])
            for packed, scales_zeros in zip(self.packed[1:], self.scales_zeros[1:]):
                y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scales_zeros)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def band_rows(self) -> int:
        """Rows dequantized at a time: BAND_BYTES of float32, in whole blocks of 64."""
        return max(BLOCK_ROWS, BAND_BYTES // (self.in_features * 4) // BLOCK_ROWS * BLOCK_ROWS)

    def _high(self) -> Tensor:
        """The plane of high bits for kvgen's kernel: empty where there is none."""
        return self.high if self.high is not None else self.packed.new_empty(0)

    def banded(self, x: Tensor) -> Tensor:
        """x times the weight for many rows: a band of dequantized rows at a time, then a matrix
        product (kvgen's kernel dequantizes a band in one pass, transposed as its layout holds it)."""
        parts = []
        for start in range(0, self.out_features, self.band_rows):
            rows = min(self.band_rows, self.out_features - start)
            if self.kernel == "kvgen":
                transposed = scratch("transposed", (self.in_features, rows), self.dtype)
                torch.ops.kvgen.int4_dequantize(self.packed, self.scales_zeros, self._high(), start, transposed)
                parts.append(torch.matmul(x, transposed))
                continue
            weight = self._dequantize_into(scratch("weight", (rows, self.in_features), self.dtype), start)
            parts.append(F.linear(x, weight))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if self.bias is None else y + self.bias

    # The tensors that hold rows, and the dimension their rows run along (torch's layout; kvgen's
    # kernel holds the scales by blocks of 64 rows, along dimension 1).
    ROW_DIMS = {"int4": {"packed": 1, "scales_zeros": 2, "high": 0}, "int8": {"q": 0, "scale": 0}}

    @staticmethod
    def join(parts: list[QuantLinear]) -> QuantLinear | None:
        """Maps of one input stacked by rows (q, k and v): one product, the parts left as views of
        its tensors (one copy in memory); None where their formats differ."""
        first = parts[0]
        if any(
            p.kind != first.kind
            or p.dtype != first.dtype
            or (p.bias is None) != (first.bias is None)
            or p.kernel != first.kernel
            or (p.kind == "int4" and p.bits != first.bits)
            for p in parts
        ):
            return None
        sizes = [p.out_features for p in parts]
        row_dims = {**QuantLinear.ROW_DIMS[first.kind], "bias": 0}
        row_dims = {name: dim for name, dim in row_dims.items() if getattr(first, name, None) is not None}
        if first.kernel == "kvgen":  # scales by blocks of rows: parts of whole blocks join along the blocks
            row_dims["scales_zeros"] = 1
            if len({p.scales_zeros.dim() for p in parts}) > 1:  # some with their scales alone: all with zeros
                for p in parts:
                    if p.scales_zeros.dim() == 4:
                        p.scales_zeros = torch.stack([p.scales_zeros, symmetric_zero(p.bits) * p.scales_zeros], -1)
        joined = {}
        for name, dim in row_dims.items():
            joined[name] = torch.cat([getattr(p, name) for p in parts], dim=dim)
            split = [size // BLOCK_ROWS for size in sizes] if dim == 1 and name == "scales_zeros" else sizes
            for p, view in zip(parts, joined[name].split(split, dim=dim)):
                setattr(p, name, view)
        bias = joined.pop("bias", None)
        fused = QuantLinear(first.kind, joined, bias)
        fused.kernel = first.kernel  # its tensors are already laid out for it
        return fused

    def extra_repr(self) -> str:
        form = f"int4, {self.bits}-bit" if self.kind == "int4" else "int8"
        return f"{self.in_features}, {self.out_features}, {form}"


class QuantEmbedding(nn.Module):
    """An embedding table read from a `QuantLinear`'s rows: a tied head and its table share one copy."""

    def __init__(self, table: QuantLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.rows(ids)


class Split(nn.Module):
    """Several maps of one input (q, k, v; gate, up) as one product -> a tuple of their outputs."""

    def __init__(self, joined: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.joined, self.sizes = joined, sizes

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)


def use_kernel(model: nn.Module, kernel: str) -> list[Tensor]:
    """Have every int4 QuantLinear of `model` multiply few rows with `kernel`: "torch" or "kvgen"
    (built for this CPU by `kvgen.kernels`, for bfloat16 models). Returns the scales no longer
    read (their memory-mapped pages can go). Called before fusing (`kvgen.runner`), so that fused
    products join tensors already laid out for their kernel; after it, each part gets a copy."""
    if kernel == "kvgen" and (why := kernels.load("int4_mm")) is not None:
        raise ValueError(f"kvgen's int4 kernel is not available: {why}")
    return [old for module in model.modules() if isinstance(module, QuantLinear) for old in module.set_kernel(kernel)]


def _place(t: Tensor) -> tuple:
    """Where a tensor's values live: a tied head is another Parameter over the embedding's memory."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def swap_in(model: nn.Module, quantized: dict[str, QuantLinear]) -> int:
    """Replace each `nn.Linear` and `nn.Embedding` of `model` whose weight is the parameter named in
    `quantized` (or shares its memory: a tied head) with that QuantLinear (or a QuantEmbedding of
    it), in place; a linear's bias carries over. Returns how many modules were replaced. The float
    weights they held are no longer referenced (memory-mapped, never read: never resident; or never
    made: parameters still on the meta device)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    fits = {
        name: q
        for name, q in quantized.items()
        if name in params and tuple(params[name].shape) == (q.out_features, q.in_features)
    }
    by_place = {_place(params[name]): q for name, q in fits.items() if not params[name].is_meta}
    swapped = 0
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, (nn.Linear, nn.Embedding)):
                continue
            q = fits.get(f"{prefix}.{name}.weight".lstrip("."))
            if q is None and not child.weight.is_meta:
                q = by_place.get(_place(child.weight))
            if q is None:
                continue
            if isinstance(child, nn.Embedding):
                setattr(module, name, QuantEmbedding(q))
            else:
                if child.bias is not None:
                    q.bias = child.bias.detach().to(q.dtype)
                setattr(module, name, q)
            swapped += 1
    return swapped


def quantize_linears(model: nn.Module, kind: str) -> dict[str, QuantLinear]:
    """A float model's linear weights (a tied head's embedding included) quantized to `kind`; int4
    where the shape fits its groups, else int8. By parameter name, for `swap_in`."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.is_floating_point():
            fits = kind == "int8" or fits_int4(module.out_features, module.in_features)
            out[f"{name}.weight"] = QuantLinear.quantize(module.weight, kind if fits else "int8")
    return out
