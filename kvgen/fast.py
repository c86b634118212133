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
- **Quantized weights** (`kvgen.quant`) are fused the same way, into one int4 or int8 product.

The model files call `layers.project`, which takes the fused product when this module built one.
State dicts keep the checkpoint's names and tensors: what is built here lives in non-persistent
buffers. The runner (`kvgen.runner`) applies it at load; the reference path skips it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loading import advise_huge_pages, populate_file_pages, release_file_pages
from .quant import QuantLinear, Split

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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor | None) -> Tensor:
    """x·Wᵀ + b through the packed copy of the weight where there is one."""
    return F.linear(x, weight, bias) if packed is None else packed_linear(x, packed, bias)


PACK_CHUNK_BYTES = 64 << 20  # weights larger than this are packed in row blocks of about this size


class FastLinear(nn.Linear):
    """An `nn.Linear` that multiplies by a prepacked copy of its weight, in blocks of rows.

    `weight` and `bias` stay the checkpoint's (state dicts and a tied embedding still use them);
    only the packed blocks, buffers never saved, are read per step. Each original block is handed
    back to the operating system once packed, so that loading never holds two copies of a weight.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rows = max(1, PACK_CHUNK_BYTES // (self.in_features * self.weight.element_size()))
        self.blocks = 0
        for start in range(0, self.out_features, self.rows):
            block = self.weight[start : start + self.rows]
            populate_file_pages([block])  # read whole now: map it in one call
            packed_block = pack(block)
            advise_huge_pages([packed_block])
            self.register_buffer(f"packed{self.blocks}", packed_block, persistent=False)
            self.blocks += 1
            release_file_pages([block])

    def forward(self, x: Tensor) -> Tensor:
        parts = []
        for i, start in enumerate(range(0, self.out_features, self.rows)):
            bias = None if self.bias is None else self.bias[start : start + self.rows]
            parts.append(packed_linear(x, getattr(self, f"packed{i}"), bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class FusedLinear(nn.Module):
    """Several float linear maps of one input as one product -> a tuple of their outputs.

    The concatenated weight and bias live in non-persistent buffers. Unpacked, the originals become
    views of them (the checkpoint's names and values, no second copy, on any device); packed, the
    originals stay as they were, unread, and their mapped pages are handed back.
    """

    def __init__(self, linears: list[nn.Linear], packed: bool) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        originals = [linear.weight for linear in linears]
        populate_file_pages(originals)  # read whole now: map them in one call
        weight = torch.cat(originals)  # (sum of outs, in)
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
        release_file_pages(originals)  # as we go, so that memory never holds two copies
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("packed", pack(weight) if packed else None, persistent=False)
        if packed:
            advise_huge_pages([self.packed])
            self.weight = None
        else:  # the originals become views of the joined weight: one copy
            for linear, w in zip(linears, weight.split(self.sizes)):
                linear.weight = nn.Parameter(w, requires_grad=False)
            for linear, b in zip(linears, [] if bias is None else bias.split(self.sizes)):
                linear.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return linear(x, self.weight, self.bias, self.packed).split(self.sizes, dim=-1)


def _fusable(linears: list[nn.Module]) -> bool:
    first = linears[0]
    return all(
        type(m) is nn.Linear
        and m.in_features == first.in_features
        and (m.bias is None) == (first.bias is None)
        and m.weight.dtype == first.weight.dtype
        for m in linears
    )


def _fuse(linears: list[nn.Module], pack_weights: bool) -> nn.Module | None:
    """One product for sibling maps of one input, or None where they cannot share one."""
    if all(isinstance(m, QuantLinear) for m in linears):
        originals = [t for m in linears for t in m.buffers()]
        populate_file_pages(originals)  # read whole now: map them in one call
        joined = QuantLinear.join(linears)  # the originals become views of its tensors
        if joined is None:
            return None
        release_file_pages(originals)  # their mapped pages: never read again (a 1.5B model's ~430 MB)
        return Split(joined, [m.out_features for m in linears])
    if _fusable(linears):
        return FusedLinear(linears, pack_weights and can_pack(linears[0].weight))
    return None


def speed_up(model: nn.Module, pack_weights: bool) -> nn.Module:
    """Build the fast path into a loaded model, in place: fuse sibling projections, let modules
    precompute what they can from their weights (`prepare`), then (with `pack_weights`, on a CPU)
    prepack every remaining float linear weight, the LM head included.

    The checkpoint tensors the fast path no longer reads are handed back to the operating system,
    one by one, where they are memory-mapped (`release_file_pages`), so that memory holds one copy
    of the weights throughout.
    """
    fused: list[nn.Module] = []  # their products now come from a fused module: never packed
    for module in list(model.modules()):
        for fused_name, names in FUSIONS.items():
            linears = [getattr(module, name, None) for name in names]
            if hasattr(module, fused_name) and all(linears) and (joined := _fuse(linears, pack_weights)) is not None:
                setattr(module, fused_name, joined)
                fused += linears
    for module in model.modules():
        if hasattr(module, "prepare"):  # what a module precomputes from its weights (Gemma's norm scales)
            module.prepare()
    if not pack_weights:
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and not any(child is f for f in fused) and can_pack(child.weight):
                setattr(module, name, FastLinear(child))
    return model
