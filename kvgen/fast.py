"""The decode fast path, built once at load: fused projections and weights in the kernel's own layout.

At batch 1 a decode step is a chain of matrix-vector products, so its speed is how fast the
weights stream from memory. These rewrites get closer to that limit, and none changes what is
computed (each output is the same dot product; only the order of its additions may differ):

- **Fused projections.** Linear maps of the same input (q, k and v; gate and up) become one
  matrix-vector product over their concatenated weights: one kernel call and one pass over the
  input instead of three, for layers whose matrices are only a few hundred kilobytes.
- **Prepacked weights.** oneDNN reorders a weight once into the blocked layout its CPU kernel
  reads; `F.linear` does the equivalent work on every call, or streams a layout its kernel reads
  slowly. On an AVX-512 EPYC this took a decode step's matrix products from ~36 to ~26 ms (Gemma
  3 270M, bfloat16; its 262k-row LM head alone from 19 to 12 ms). Whether it pays is the CPU's
  business, so it is measured once per processor (`kvgen.loading.dtype`), not assumed. The packed
  weights' pages are advised into 2 MB ones (`kvgen.loading.advise_huge_pages`): fewer address
  translations for a step that streams them all.
- **Plain rows for the compiler.** A compiled step of one row (kvgen.generate's `decode_compiled`)
  drops the packed copies (`unpack`) and writes each product as a multiply-and-sum (`linear`),
  which inductor turns into its own loop over the weight's rows: on the same EPYC that loop
  streams at the memory's limit, where oneDNN's packed kernel reaches about two thirds of it.

The model files call `layers.project`, which takes the fused product when this module built one.
State dicts keep the checkpoint's names and tensors: what is built here lives in non-persistent
buffers, and `kvgen.load(..., fast=False)` gives the plain reference path.
"""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loading import (
    advise_huge_pages,
    merge_huge_pages,
    populate_file_pages,
    release_file_pages,
    return_freed_memory,
)
from .loading.blocks import Blocks

# Sibling linear maps of one input that a fused product replaces, and the attribute it takes.
FUSIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def packing_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds for x86 and Arm do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def can_pack(weight: Tensor) -> bool:
    """oneDNN's prepacked linear runs on CPU float32 and bfloat16 weights."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and packing_available()


def pack(weight: Tensor) -> Tensor:
    """(out, in) weight -> the same values in oneDNN's blocked layout (an mkldnn tensor, a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b for a weight from `pack`: the same values as `F.linear` on the original."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# `torch.compile` (kvgen.generate's `compile_step`) cannot trace an opaque packed tensor, so a
# compiled step reaches each packed weight through a handle: a tensor of `out_features` entries
# holding the weight's number in `HANDLED`, passed to an op of our own that the compiler keeps as
# one call. A tensor, because a Python int would be frozen into the graph as a constant, and every
# layer would then multiply by the first layer's weight. (kvgen.screen's head is reached the same way.)
HANDLED: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
library = torch.library.Library("kvgen", "DEF")
library.define("packed_linear(Tensor x, Tensor handle, Tensor? bias) -> Tensor")
library.impl("packed_linear", lambda x, handle, bias: packed_linear(x, HANDLED[int(handle[0])], bias), "CPU")
torch.library.register_fake(
    "kvgen::packed_linear", lambda x, handle, bias: x.new_empty(*x.shape[:-1], handle.shape[0]), lib=library
)


def handle_for(target: Any, out_features: int) -> Tensor:
    """The handle through which a compiled step reaches `target` (see above)."""
    number = next(_numbers)
    HANDLED[number] = target
    return torch.full((out_features,), number, dtype=torch.int64)


_numbers = itertools.count()


def packed_product(module: nn.Module, i: int, x: Tensor, bias: Tensor | None) -> Tensor:
    """x times `module`'s i-th packed weight, `packed{i}`, or through `handle{i}` while compiling."""
    if torch.compiler.is_compiling():
        return torch.ops.kvgen.packed_linear(x, getattr(module, f"handle{i}"), bias)
    return packed_linear(x, getattr(module, f"packed{i}"), bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, blocks: Blocks | None = None) -> Tensor:
    """x·Wᵀ + b, as `F.linear`; in a compiled step of one row on a CPU, as a multiply-and-sum,
    over `blocks` where the weight has them (a GGUF's own values, in int8: `kvgen.loading.blocks`).

    Compiled, `F.linear` stays a call to oneDNN, whose matrix-vector kernel streams bfloat16
    weights at ~18 GB/s on 2 cores of an EPYC. A multiply-and-sum over rows of the weight becomes
    inductor's own loop, which streams them at ~31 GB/s, the memory's limit: Gemma 3 270M's 72
    layer products took 6.7-7.1 ms this way against 9.0-9.7 ms, and its compiled decode step went
    from 38.4 to 47.6 tokens/s in `kvgen bench`. The same products, summed in float32 in another
    order, rounded once. Only for a weight held in contiguous rows: a transposed view would be read
    across its rows (1.6 GB/s).
    """
    # compiling first: an eager call asks nothing more
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and x.device.type == "cpu":
        if blocks is not None:
            y = blocks.product(x)
        elif weight.stride(-1) == 1:
            y = (x[..., None, :].float() * weight.float()).sum(-1)
        else:
            return F.linear(x, weight, bias)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


PACK_CHUNK_BYTES = 64 << 20  # weights larger than this are packed in row blocks of about this size


class FastLinear(nn.Linear):
    """An `nn.Linear` on the fast path: it multiplies by a prepacked copy of its weight (`packed`)
    or, unpacked, by the weight itself through `linear` (or by its GGUF `blocks`, where the
    linear it replaces had them: `kvgen.loading.blocks`).

    `weight` and `bias` stay the checkpoint's (state dicts and a tied embedding still use them);
    only the packed blocks, buffers never saved, are read per step. A large weight (an LM head) is
    packed in blocks of rows, each original block handed back to the operating system once packed,
    so that loading never holds two copies of it.
    """

    def __init__(self, linear: nn.Linear, packed: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.blocks: Blocks | None = getattr(linear, "blocks", None)
        self.rows = max(1, PACK_CHUNK_BYTES // (self.in_features * self.weight.element_size()))
        self.starts = list(range(0, self.out_features, self.rows)) if packed else []  # the packed blocks' first rows
        for i, start in enumerate(self.starts):
            block = self.weight[start : start + self.rows]
            populate_file_pages([block])  # read whole now: map it in one call
            packed_block = pack(block)
            advise_huge_pages([packed_block])
            self.register_buffer(f"packed{i}", packed_block, persistent=False)
            self.register_buffer(f"handle{i}", handle_for(packed_block, packed_block.size(0)), persistent=False)
            release_file_pages([block])

    def forward(self, x: Tensor) -> Tensor:
        if not self.starts:
            return linear(x, self.weight, self.bias, self.blocks)
        if len(self.starts) == 1:
            return packed_product(self, 0, x, self.bias)
        parts = []
        for i, start in enumerate(self.starts):
            bias = None if self.bias is None else self.bias[start : start + self.rows]
            parts.append(packed_product(self, i, x, bias))
        return torch.cat(parts, dim=-1)

    def unpack(self) -> None:
        """Drop the packed blocks: products read the weight itself from now on, in rows (`unpack`)."""
        for i in range(len(self.starts)):
            delattr(self, f"packed{i}")
            delattr(self, f"handle{i}")
        self.starts = []
        if not self.weight.is_contiguous():  # GPT-2's weights are views of (in, out) matrices
            self.weight = nn.Parameter(self.weight.detach().contiguous(), requires_grad=False)


class FusedLinear(nn.Module):
    """Several linear maps of one input as one product -> a tuple of their outputs.

    The concatenated weight and bias live in non-persistent buffers. Unpacked, the originals become
    views of them (the checkpoint's names and values, no second copy, on any device); packed, the
    originals stay as they were, unread, and their mapped pages are handed back.
    """

    def __init__(self, linears: list[nn.Linear], packed: bool) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        self.linears = linears  # a plain list: they stay their parent's submodules, not this one's
        self.packed = packed
        self.blocks = Blocks.join([getattr(linear, "blocks", None) for linear in linears])
        for linear in linears:  # the joined copy replaces theirs
            linear.blocks = None
        weight, bias = self.joined()
        self.register_buffer("bias", bias, persistent=False)
        if packed:  # packed_product's names for the one packed weight
            self.register_buffer("weight", pack(weight), persistent=False)
            advise_huge_pages([self.weight])
            self.packed0 = self.weight
            self.register_buffer("handle0", handle_for(self.weight, self.weight.size(0)), persistent=False)
        else:
            self.use_plain(weight)

    def joined(self) -> tuple[Tensor, Tensor | None]:
        """The originals' weights and biases, concatenated (a copy); their mapped pages handed back."""
        originals = [linear.weight for linear in self.linears]
        populate_file_pages(originals)  # read whole now: map them in one call
        weight = torch.cat(originals)  # (sum of outs, in)
        bias = None if self.linears[0].bias is None else torch.cat([linear.bias for linear in self.linears])
        release_file_pages(originals)  # as we go, so that memory never holds two copies
        return weight, bias

    def use_plain(self, weight: Tensor) -> None:
        """Multiply by `weight` itself, and make the originals views of it: one copy of the weights."""
        self.packed = False
        self.register_buffer("weight", weight, persistent=False)
        for linear, w in zip(self.linears, weight.split(self.sizes)):
            linear.weight = nn.Parameter(w, requires_grad=False)
        for linear, b in zip(self.linears, [] if self.bias is None else self.bias.split(self.sizes)):
            linear.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        y = packed_product(self, 0, x, self.bias) if self.packed else linear(x, self.weight, self.bias, self.blocks)
        return y.split(self.sizes, dim=-1)

    def unpack(self) -> None:
        """Drop the packed weight for the concatenated plain one (`unpack`)."""
        if self.packed:
            del self.packed0, self.handle0, self.weight
            self.use_plain(self.joined()[0])


def _fusable(linears: list[nn.Module]) -> bool:
    first = linears[0]
    return all(
        type(m) is nn.Linear
        and m.in_features == first.in_features
        and (m.bias is None) == (first.bias is None)
        and m.weight.dtype == first.weight.dtype
        for m in linears
    )


def speed_up(model: nn.Module, pack_weights: bool, screen_head: bool = False, store: Path | None = None) -> nn.Module:
    """Build the fast path into a loaded model, in place: fuse sibling projections, let modules
    precompute what they can from their weights (`prepare`), then (with `pack_weights`, on a CPU)
    prepack every remaining linear weight, the LM head included.

    `screen_head` makes greedy steps read the LM head in int8, exactly (`kvgen.screen`; kept in
    `store` once computed); its full-precision copy is then packed only when something needs every logit.

    The checkpoint tensors the fast path no longer reads are handed back to the operating system,
    one by one, where they are memory-mapped (`release_file_pages`), so that memory holds one copy
    of the weights throughout.
    """
    fused: list[nn.Linear] = []  # their products now come from a FusedLinear: never packed
    for module in list(model.modules()):
        for fused_name, names in FUSIONS.items():
            linears = [getattr(module, name, None) for name in names]
            if hasattr(module, fused_name) and all(linears) and _fusable(linears):
                setattr(module, fused_name, FusedLinear(linears, pack_weights and can_pack(linears[0].weight)))
                fused += linears
    for module in model.modules():
        if hasattr(module, "prepare"):  # what a module precomputes from its weights (Gemma's norm scales)
            module.prepare()
    from . import screen  # it builds on this module's handles

    head = getattr(model, "lm_head", None)
    if screen_head and screen.available(head):
        make_full = (lambda: FastLinear(head, packed=True)) if pack_weights and can_pack(head.weight) else None
        model.lm_head = screen.ScreenedHead(head, make_full, store)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and not any(child is f for f in fused):
                setattr(module, name, FastLinear(child, packed=pack_weights and can_pack(child.weight)))
    return model


def unpack(model: nn.Module) -> None:
    """Drop the model's packed copies: from now on its products read the checkpoint's weights, in
    rows (`linear`), which is what a compiled step of one row streams fastest. Eager products then
    go through `F.linear`: a 500-token prefill ~5-10 % slower, a batch of 8 decoding ~1.6× slower
    in its matrix products. Memory keeps one copy of the weights throughout: the packed ones are
    freed as the plain ones are read in."""
    for module in list(model.modules()):
        if hasattr(module, "unpack"):
            module.unpack()
    return_freed_memory()


def merge_packed_pages(model: nn.Module) -> None:
    """Merge the model's packed weights into 2 MB pages now (`loading.merge_huge_pages`), for a run
    that will take many steps. A compiled batch step (kvgen.generate's `decode_compiled`) does, in
    its warm-up: merged, a compiled one-row step over packed weights took 30.8-31.6 ms on Gemma 3
    270M against 31.7-35.8 ms, in 3 of 3 pairs (one-row steps now read plain rows instead)."""
    merge_huge_pages([buffer for buffer in model.buffers() if buffer.is_mkldnn])
