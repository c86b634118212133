"""The decode fast path, built once at load: fused projections and weights in the kernel's own layout.

At batch 1 a decode step is a chain of matrix-vector products, so its speed is how fast the
weights stream from memory. Two rewrites get closer to that limit, and neither changes what is
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

from .loading import advise_huge_pages, merge_huge_pages, populate_file_pages, release_file_pages

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


PACK_CHUNK_BYTES = 64 << 20  # weights larger than this are packed in row blocks of about this size


class PackedLinear(nn.Linear):
    """An `nn.Linear` that multiplies by a prepacked copy of its weight.

    `weight` and `bias` stay the checkpoint's (state dicts and a tied embedding still use them);
    only the packed blocks, buffers never saved, are read per step. A large weight (an LM head) is
    packed in blocks of rows, each original block handed back to the operating system once packed,
    so that loading never holds two copies of it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rows = max(1, PACK_CHUNK_BYTES // (self.in_features * self.weight.element_size()))
        self.starts = list(range(0, self.out_features, self.rows))
        for i, start in enumerate(self.starts):
            block = self.weight[start : start + self.rows]
            populate_file_pages([block])  # read whole now: map it in one call
            packed = pack(block)
            advise_huge_pages([packed])
            self.register_buffer(f"packed{i}", packed, persistent=False)
            self.register_buffer(f"handle{i}", handle_for(packed, packed.size(0)), persistent=False)
            release_file_pages([block])

    def forward(self, x: Tensor) -> Tensor:
        if len(self.starts) == 1:
            return packed_product(self, 0, x, self.bias)
        parts = []
        for i, start in enumerate(self.starts):
            bias = None if self.bias is None else self.bias[start : start + self.rows]
            parts.append(packed_product(self, i, x, bias))
        return torch.cat(parts, dim=-1)


class FusedLinear(nn.Module):
    """Several linear maps of one input as one product -> a tuple of their outputs.

    The concatenated weight and bias live in non-persistent buffers. Unpacked, the originals become
    views of them (the checkpoint's names and values, no second copy, on any device); packed, the
    originals stay as they were, unread, and the caller hands their mapped pages back.
    """

    def __init__(self, linears: list[nn.Linear], packed: bool) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        weight = torch.cat([linear.weight for linear in linears])  # (sum of outs, in)
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
        self.packed = packed
        self.register_buffer("weight", pack(weight) if packed else weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        if packed:  # packed_product's names for the one packed weight
            advise_huge_pages([self.weight])
            self.packed0 = self.weight
            self.register_buffer("handle0", handle_for(self.weight, self.weight.size(0)), persistent=False)
        if not packed:  # the originals become views of the fused tensors: one copy of the weights
            for linear, w in zip(linears, weight.split(self.sizes)):
                linear.weight = nn.Parameter(w, requires_grad=False)
            for linear, b in zip(linears, [] if bias is None else bias.split(self.sizes)):
                linear.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        y = packed_product(self, 0, x, self.bias) if self.packed else F.linear(x, self.weight, self.bias)
        return y.split(self.sizes, dim=-1)


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
                packed = pack_weights and can_pack(linears[0].weight)
                originals = [linear.weight for linear in linears]
                populate_file_pages(originals)  # read whole now: map them in one call
                setattr(module, fused_name, FusedLinear(linears, packed))
                release_file_pages(originals)  # as we go, so that loading never holds two copies
                fused += linears
    for module in model.modules():
        if hasattr(module, "prepare"):  # what a module precomputes from its weights (Gemma's norm scales)
            module.prepare()
    from . import screen  # it builds on this module's handles

    head = getattr(model, "lm_head", None)
    if screen_head and screen.available(head):
        make_full = (lambda: PackedLinear(head)) if pack_weights and can_pack(head.weight) else None
        model.lm_head = screen.ScreenedHead(head, make_full, store)
    if pack_weights:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear and can_pack(child.weight) and not any(child is f for f in fused):
                    setattr(module, name, PackedLinear(child))
    return model


def merge_packed_pages(model: nn.Module) -> None:
    """Merge the model's packed weights into 2 MB pages now (`loading.merge_huge_pages`), for a run
    that will take many steps. A compiled step (kvgen.generate's `compile_step`) does, in its warm-up:
    merged, it took 30.8-31.6 ms a step on Gemma 3 270M against 31.7-35.8 ms, in 3 of 3 pairs."""
    merge_huge_pages([buffer for buffer in model.buffers() if buffer.is_mkldnn])
