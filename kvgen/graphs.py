"""Decode steps recorded once as a CUDA graph and replayed.

On a GPU a small model's decode step is bound by launching kernels, not by the GPU: Gemma 3 270M
launches well over a thousand per token, each some microseconds of Python and driver work for a kernel
that runs for less. A CUDA graph records the launches of one step and replays all of them with one
call. A replay runs none of the step's Python: it repeats the same kernels on the same memory, with
every Python number (a shape, a slice bound, a scalar) as it was while recording. So a step can be
recorded only if each step differs from the last in tensor contents alone:

- **fixed shapes**: the static cache, and its ring in sliding-window layers, attend over all their
  slots at every step; the mask hides the empty ones;
- **no Python number that changes per step**: those caches keep their write index on the device
  and advance it there (`kvgen.cache`); the token and position reach the graph through tensors it
  reads (`GraphDecoder.token`, `.position`), copied in before each replay;
- **no host sync or host-to-device copy inside the step**: RoPE frequencies are buffers moved with
  the model; masks are not memoised off the CPU.

tests/test_graphs.py holds every model family to this on a CPU: it records the step's operator
calls and replays them without its Python, as a graph would (`GraphDecoder` takes that stand-in
for `CudaGraph`), and the tokens must not change.

The first step runs eagerly on a side stream (the warm-up CUDA graphs ask for: lazy
initialisation stays out of the recording); the second is recorded, then replayed; every later
step is replayed. The logits come back in the graph's own output tensor, which the next replay
overwrites: the loop samples from it before asking for the next step.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import Tensor

from .cache import LayerCache


class CudaGraph:
    """`torch.cuda.CUDAGraph` behind the three calls `GraphDecoder` makes."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def record(self) -> AbstractContextManager:
        return torch.cuda.graph(self.graph)

    def replay(self) -> None:
        self.graph.replay()

    @staticmethod
    def warm_up(step: Callable[[], Tensor]) -> Tensor:
        """Run `step` once on a side stream, as CUDA asks before recording."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = step()
        torch.cuda.current_stream().wait_stream(side)
        return out


def graph_safe(cache: list[LayerCache]) -> bool:
    """Whether decode steps over `cache` read no Python number that changes from step to step, so
    that a CUDA graph can record one (and `torch.compile` compile one once)."""
    return all(getattr(layer, "graph_safe", False) for layer in cache)


def can_record(cache: list[LayerCache], device: torch.device) -> bool:
    """Whether decode steps over `cache` on `device` can be recorded as a CUDA graph."""
    return device.type == "cuda" and graph_safe(cache)


class GraphDecoder:
    """A decode step over fixed tensors, recorded once and replayed.

    `step(token, position)` is the eager step, (B,) token and position -> (B, vocab) logits (the
    loop's `decode_one` over one cache). Called the same way, this gives the same logits, valid
    until the next call.
    """

    def __init__(self, step: Callable[[Tensor, Tensor], Tensor], batch: int, device: torch.device, graph=CudaGraph):
        self.step, self.graph_kind = step, graph
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # what the graph reads
        self.position = torch.zeros_like(self.token)
        self.graph = None
        self.logits: Tensor | None = None  # what the graph writes
        self.warm = False

    def _step(self) -> Tensor:
        return self.step(self.token, self.position)

    def __call__(self, token: Tensor, position: Tensor) -> Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        if not self.warm:
            self.warm = True
            return self.graph_kind.warm_up(self._step)
        if self.graph is None:
            self.graph = self.graph_kind()
            with self.graph.record():  # records the step's kernels; runs none of them
                self.logits = self._step()
        self.graph.replay()
        return self.logits
