"""An exact greedy choice that reads the LM head in int8: screen every token cheaply, confirm the few that could win.

At batch 1 the LM head is most of a decode step's bytes (Gemma 3 270M: 335 of 536 MB), and a greedy
step needs only its largest logit. `ScreenedHead` finds that token reading the head's weights in
int8, half the bytes, and still picks the token the full product picks:

1. **Rotate.** Activations and weights are turned by one fixed orthogonal matrix R (x·w = xR·wR):
   random signs, then a Hadamard transform. The final hidden state has a few channels ten times
   larger than the rest; rotated, its size is spread over all of them, so 7-bit activations and
   8-bit weights (a scale per row) lose little. (QuaRot's trick, for a bound instead of a model.)
2. **Screen.** fbgemm's int8 product gives approximate logits a_v, each within a bound of the
   exact x·w_v: by Cauchy-Schwarz, |x·w_v - a_v| <= |x|·|e_v| + |e_x|·|ŵ_v| + slack, where e_v is
   row v's quantisation error (measured at load) and e_x the activations' (measured per step).
3. **Confirm.** Every token whose upper bound reaches the best lower bound, less the spacing of
   the logits' own dtype, is a candidate: a few to a few thousand of 262,144 on Gemma 3 270M. Their
   logits are computed by `F.linear` over the checkpoint's rows of just them (the plain head's
   values, up to the order of additions); every other logit comes back as -inf. That tensor's
   argmax is the full product's argmax, by construction.

Only greedy choices may use it: the loop says so around a forward (`argmax_only`); sampling,
log-probabilities and tracing get every logit, from the full product.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from .fast import HANDLED, handle_for, library, linear
from .loading import populate_file_pages, release_file_pages, save_tensors

HADAMARD_BLOCK = 128  # the rotation's Hadamard part: the largest power of two up to this that divides the width
# fbgemm's AVX2 kernel adds pairs of u8·s8 products in int16; activations of 7 bits (0..127) cannot overflow it.
ACTIVATION_LEVELS = 127
INT8_BLOCK_BYTES = 40 << 20  # int8 weights are packed in row blocks of this size: fbgemm packs larger ones slower
QUANTIZE_ROWS = 16384  # rows rotated and quantised at a time at load (float32 scratch of 40 MB at width 640)
MAX_CANDIDATE_SHARE = 1 / 8  # beyond this share of the vocabulary, the full product is cheaper


def available(linear: nn.Module) -> bool:
    """Whether `linear` can be screened: a bias-free CPU head in floating point, and a torch with fbgemm (x86)."""
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and linear.weight.device.type == "cpu"
        and linear.weight.dtype.is_floating_point
        and "fbgemm" in torch.backends.quantized.supported_engines
    )


def hadamard(n: int) -> Tensor:
    """The (n, n) Hadamard matrix scaled to be orthogonal (Sylvester's construction; n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


class Rotation:
    """x -> x·R for one fixed orthogonal R = diag(signs)·(H ⊗ Q), in float32.

    H is a Hadamard block (128 wide when the width allows) and Q a random orthogonal matrix over
    what is left (5 wide for Gemma's 640): a row costs width·(128 + 5) multiply-adds, not width².
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.block = math.gcd(dim, HADAMARD_BLOCK)
        self.rest = dim // self.block
        self.signs = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
        self.hadamard = hadamard(self.block)
        gaussian = torch.randn(self.rest, self.rest, generator=generator, dtype=torch.float64)
        self.mixer = torch.linalg.qr(gaussian)[0].float().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim) float32. With x laid out as (block, rest), x·R is H·x·Q."""
        lead = x.shape[:-1]
        x = (x.float() * self.signs).reshape(-1, self.block, self.rest) @ self.mixer
        x = x.transpose(1, 2) @ self.hadamard  # (N, rest, block): H is symmetric, so this is (H·x)ᵀ
        return x.transpose(1, 2).reshape(*lead, -1)


def quantize(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(R, D) rotated float32 rows -> int8 values, per-row scales (R,), and each row's quantisation
    error |e_v| (R,), computed before anything is rounded away."""
    scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(rows / scales[:, None]).clamp(-127, 127)
    error = torch.linalg.vector_norm(rows - q * scales[:, None], dim=1)
    return q.to(torch.int8), scales, error


def pack_int8(q: Tensor, scales: Tensor, rows: int) -> list[torch.ScriptObject]:
    """int8 rows and their scales -> fbgemm's prepacked weights (copies, in its own layout), one per
    block of `rows` rows. fbgemm packs a block on one core and lets go of the GIL, so the blocks are
    packed in parallel threads: 0.62-0.74 s against 1.06-1.17 s one after another for Gemma 3 270M's
    head on 2 cores. A memory-mapped block's pages are handed back once it is packed."""

    def pack(start: int) -> torch.ScriptObject:
        block, block_scales = q[start : start + rows], scales[start : start + rows].double()
        zero_points = torch.zeros_like(block_scales, dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(block, block_scales, zero_points, 0)
        packed = torch.ops.quantized.linear_prepack(weight, None)
        release_file_pages([block])
        return packed

    engine = torch.backends.quantized.engine  # process-wide: set once, around every thread
    with warnings.catch_warnings(), ThreadPoolExecutor(torch.get_num_threads()) as pool:
        warnings.simplefilter("ignore")  # quantised tensors are deprecated, fbgemm's linear is not (yet) replaced
        torch.backends.quantized.engine = "fbgemm"
        try:
            return list(pool.map(pack, range(0, len(q), rows)))
        finally:
            torch.backends.quantized.engine = engine


STORED = ("q", "scales", "error_norms", "row_norms")  # what `ScreenedHead` computes from a weight, in this order
STORE_VERSION = "2"  # bump when the rotation or the quantisation changes


def store_path(folder: Path, dtype: torch.dtype) -> Path:
    """Where the screened head of the model in `folder`, loaded in `dtype`, is kept: in the kvgen
    cache, named by the weight files' paths, sizes and times, so that a changed checkpoint gets a new one."""
    from .loading.convert import cache_root

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model.bin"))
    stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([STORE_VERSION, str(dtype), stamps]).encode()).hexdigest()[:20]
    return cache_root() / "screened-heads" / f"{key}.safetensors"


def read_store(path: Path, weight: Tensor) -> dict[str, Tensor] | None:
    """A stored screened head for `weight`, memory-mapped; None if there is none, or it does not fit."""
    try:
        tensors = load_file(path)
    except Exception:  # missing, or unreadable (a partial copy): computed again
        return None
    rows, width = weight.shape
    shapes = {"q": (rows, width), "scales": (rows,), "error_norms": (rows,), "row_norms": (rows,)}
    return tensors if {name: tuple(t.shape) for name, t in tensors.items()} == shapes else None


class ScreenedHead(nn.Linear):
    """An LM head whose greedy choice reads int8 weights and stays exact (see the module's docstring).

    `weight` stays the checkpoint's (the state dict is unchanged; a tied embedding still uses it).
    With `argmax_only` set, `forward` returns logits that are exact for every token that could be the
    largest and -inf elsewhere; otherwise every logit, from `full()`: a module made on first use
    by `make_full` (kvgen.fast packs a copy of the weight), since a greedy run never needs it.
    """

    def __init__(
        self, linear: nn.Linear, make_full: Callable[[], nn.Module] | None = None, store: Path | None = None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.argmax_only = False
        self.screened = self.fallbacks = 0  # calls answered by the screen, and by the full product instead
        self.make_full, self._full = make_full, None
        self.rotation = Rotation(self.in_features)
        # Worst cases of float32 rounding, relative to the norms involved (Higham's gamma_n = n·u):
        # rotating a vector (block + rest terms per element, over `in_features` elements) ...
        unit, width = 2**-24, self.in_features
        self.rotation_error = (self.rotation.block + self.rotation.rest + 2) * unit * math.sqrt(width)
        # ... and the plain head's own sum of `in_features` products, |x|·|w_v| at most by Cauchy-Schwarz.
        self.rounding = self.rotation_error + 2 * width * unit
        quantized = read_store(store, self.weight) if store is not None else None
        if quantized is None:
            quantized = {name: torch.cat(parts) for name, parts in zip(STORED, zip(*self.quantize_rows()))}
            if store is not None:
                save_tensors(store, quantized)  # one we cannot write is computed again next time
        # fbgemm's packed int8 weights, one per block of rows
        self.blocks = pack_int8(quantized["q"], quantized["scales"], max(1, INT8_BLOCK_BYTES // self.in_features))
        self.register_buffer("error_norms", quantized["error_norms"].clone(), persistent=False)  # (V,)
        self.register_buffer("row_norms", quantized["row_norms"].clone(), persistent=False)  # (V,)
        self.widest_error, self.widest_row = float(self.error_norms.max()), float(self.row_norms.max())
        self.register_buffer("handle", handle_for(self, self.out_features), persistent=False)

    def quantize_rows(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The weight, QUANTIZE_ROWS rows at a time -> their rotated int8 values and scales, a bound on
        each row's error |e_v| (rounding slack included) and max(|w_v|, |ŵ_v|)."""
        for first in range(0, self.out_features, QUANTIZE_ROWS):
            original = self.weight.detach()[first : first + QUANTIZE_ROWS]
            populate_file_pages([original])  # read whole now: map it in one call
            q, scales, error = quantize(self.rotation(original))
            norm = torch.linalg.vector_norm(original.float(), dim=1)
            release_file_pages([original])  # as we go: loading never holds the head twice
            dequantized_norm = torch.linalg.vector_norm(q.float() * scales[:, None], dim=1)
            yield q, scales, error + self.rounding * norm, torch.maximum(norm, dequantized_norm)

    def full(self) -> nn.Module | None:
        """The module that computes every logit, made on first use (None: the plain product)."""
        if self._full is None and self.make_full is not None:
            object.__setattr__(self, "_full", self.make_full())  # not a submodule: its weight is this one's
        return self._full

    def forward(self, x: Tensor) -> Tensor:
        # Opaque to the compiler: the screen's shapes depend on data, and a packed copy is made on first use.
        if torch.compiler.is_compiling() and (self.argmax_only or self.make_full is not None):
            return torch.ops.kvgen.head_logits(x, self.handle, self.argmax_only)
        return self.logits(x, self.argmax_only)

    def logits(self, x: Tensor, argmax_only: bool) -> Tensor:
        if argmax_only:
            return self.screened_logits(x)
        full = self.full()
        return full(x) if full is not None else linear(x, self.weight)

    def unpack(self) -> None:
        """Every logit from the weight itself from now on, never from a packed copy (`kvgen.fast.unpack`)."""
        self.make_full = None
        object.__setattr__(self, "_full", None)

    def approximate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, D) -> fbgemm's int8 logits a (N, V), and per row |x| and a bound on |x - x̂| (N,)."""
        rotated = self.rotation(x)
        low, high = rotated.min().clamp(max=0), rotated.max().clamp(min=0)
        # The range maps onto 0..126 steps, so rounding never clamps: each element is off by at most half a step.
        scale = float((high - low) / (ACTIVATION_LEVELS - 1)) or 1.0
        zero_point = int(torch.round(-low / scale))
        x_error = torch.linalg.vector_norm(rotated - torch.round(rotated / scale) * scale, dim=1)
        # Where fbgemm rounds a near-tie the other way, that element is still off by about half a step;
        # and the float32 rotation itself is off the exact one by up to rotation_error·|x|.
        x_norm = torch.linalg.vector_norm(x.float(), dim=1)
        x_error += 1e-4 * math.sqrt(x.shape[-1]) * scale + self.rotation_error * x_norm
        int8_product = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
        a = torch.cat([int8_product(rotated, scale, zero_point, block) for block in self.blocks], dim=-1)
        return a, x_norm, x_error

    def bound(self, a: Tensor, x_norm: Tensor, x_error: Tensor, cols: Tensor) -> Tensor:
        """How far the exact logits of tokens `cols` can be from their int8 ones `a`, given each one's
        row's |x| and |x - x̂| (see `screened_logits`)."""
        return x_norm * self.error_norms[cols] + x_error * self.row_norms[cols] + 1e-5 * a.abs()

    def screened_logits(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits: exact where a token could be the largest, -inf elsewhere.

        Each a_v is within b_v = |x|·|e_v| + |x - x̂|·max(|w_v|, |ŵ_v|) + 1e-5·|a_v| of the exact
        product: x·w - a = x·(w - ŵ) + (x - x̂)·ŵ + fbgemm's float rescaling of exact int32 sums,
        and a rotation changes no norm. `error_norms` and the bound on |x - x̂| also cover, at their
        worst, the float32 rotations and the plain head's own float32 sums. A token is kept when
        a_v + b_v reaches the best a_u - b_u, less the spacing of the logits' dtype (two values
        closer than that may round to a tie).
        """
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        a, x_norm, x_error = self.approximate(x)
        high = a.amax(dim=-1)  # (amax and amin: 30 µs over 262k logits, where aminmax takes 600)
        largest = torch.maximum(high, -a.amin(dim=-1))  # (N,)
        widest = x_norm * self.widest_error + x_error * self.widest_row + 1e-5 * largest  # any token's bound
        # Logits are rounded to the head's dtype: tokens closer than its spacing there may come out tied.
        spacing = 2 * torch.finfo(x.dtype).eps * (largest + widest)
        # The token with the largest a_v has an exact logit of at least high - widest; a token further
        # below than another widest bound and the spacing cannot catch up with it.
        rows, cols = (a >= (high - 2 * widest - spacing)[:, None]).nonzero(as_tuple=True)
        if len(cols) > MAX_CANDIDATE_SHARE * a.numel():
            self.fallbacks += 1
            return self.logits(x, argmax_only=False).reshape(*lead, -1)
        self.screened += 1
        near = a[rows, cols]
        margin = self.bound(near, x_norm[rows], x_error[rows], cols)
        lower = torch.full_like(largest, float("-inf")).scatter_reduce(0, rows, near - margin, "amax")
        keep = near + margin >= (lower - spacing)[rows]  # each row's tokens that can still be its largest
        rows, cols = rows[keep], cols[keep]
        logits = torch.full((len(x), self.out_features), float("-inf"), dtype=x.dtype)
        for row in range(len(x)):  # each row's candidates, through the plain head's product
            mine = cols[rows == row]
            logits[row, mine] = F.linear(x[row : row + 1], self.weight[mine])[0]
        return logits.reshape(*lead, -1)


library.define("head_logits(Tensor x, Tensor handle, bool argmax_only) -> Tensor")
library.impl("head_logits", lambda x, handle, argmax_only: HANDLED[int(handle[0])].logits(x, argmax_only), "CPU")
torch.library.register_fake(
    "kvgen::head_logits", lambda x, handle, argmax_only: x.new_empty(*x.shape[:-1], handle.shape[0]), lib=library
)


@contextmanager
def argmax_only(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within this block, a forward of `model` may return logits that keep only their argmax exact
    (when its `lm_head` is screened): for a caller that takes the argmax and reads nothing else."""
    head = getattr(model, "lm_head", None)
    if not (on and isinstance(head, ScreenedHead)):
        yield
        return
    head.argmax_only = True
    try:
        yield
    finally:
        head.argmax_only = False
