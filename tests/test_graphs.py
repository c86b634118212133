"""Decode steps recorded as a graph and replayed (`kvgen.graphs`), checked on a CPU.

A CUDA graph replays the kernels of the step it recorded, on the same memory, with every Python
number as it was: none of the step's Python runs again. `RecordedGraph` does the same with
PyTorch's operator calls. Recording writes down each call with its arguments (tensors by identity,
numbers by value) and refuses what a CUDA graph cannot record (a host sync); replaying calls them
again with those arguments and copies each result into the tensor recorded for it. A step that
read a Python number which changes per step (a slice bound, a write index) would replay the
recorded value, and its tokens would drift from the eager loop's: that is what these tests catch.
"""

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kvgen
from kvgen import graphs
from kvgen.cache import make_cache
from kvgen.generate import decode_one, generate_tokens, prefill
from kvgen.models import layers
from kvgen.testing import build_gemma3, build_gpt2, build_llama, build_qwen3

# Operators that wait for the device (or read a tensor's value on the host): a recording fails on them.
HOST_SYNCS = {"_local_scalar_dense", "item", "equal", "nonzero", "is_nonzero", "allclose"}


class _Recorder(TorchDispatchMode):
    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_SYNCS:
            raise RuntimeError(f"a CUDA graph cannot record {name}: it reads a device value on the host")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    """A CPU stand-in for `graphs.CudaGraph`: replays operator calls, not Python (see the module doc)."""

    def __init__(self) -> None:
        self.calls: list = []
        self.replays = 0

    @contextmanager
    def record(self):
        with _Recorder(self.calls):
            yield
        self.recorded = True  # recording ran the step (a CUDA graph's would not): the next replay has run

    def replay(self) -> None:
        self.replays += 1
        if self.recorded:
            self.recorded = False
            return
        with torch.inference_mode():  # as the recorded step ran (decode_one)
            self._run_calls()

    def _run_calls(self) -> None:
        for func, args, kwargs, out in self.calls:
            result = func(*args, **kwargs)
            for held, new in zip(tree_leaves(out), tree_leaves(result)):
                if isinstance(held, torch.Tensor) and held is not new:
                    held.copy_(new)  # the graph's fixed memory: later calls and the caller read `held`

    @staticmethod
    def warm_up(step):
        return step()


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The CPU-only shortcuts in a step: off the CPU, masks are never memoised (`layers._same`), and
    rows are not cut to their spans (which reads numbers on the host)."""
    monkeypatch.setattr(layers, "_same", lambda a, b: False)
    monkeypatch.setattr(layers, "CUT_TO_SPANS", False)


@pytest.fixture
def recorded_graphs(monkeypatch, as_on_a_gpu):
    """generate_tokens on a CPU takes the graph path, with `RecordedGraph` for the CUDA graph."""
    made: list[RecordedGraph] = []

    def graph():
        made.append(RecordedGraph())
        return made[-1]

    graph.warm_up = RecordedGraph.warm_up
    monkeypatch.setattr(graphs, "CudaGraph", graph)
    monkeypatch.setattr(graphs, "can_record", lambda cache, device: graphs.graph_safe(cache))
    return made


BUILDERS = {
    "gpt2": (build_gpt2, {}),
    "llama": (build_llama, dict(num_key_value_heads=2)),
    "qwen3": (build_qwen3, dict(num_key_value_heads=2)),
    "gemma3-sliding": (build_gemma3, dict(num_key_value_heads=1, sliding_window=6)),  # the ring wraps
}
PROMPTS = ["the cat sat on the mat", "It was the best of times", "a"]  # batched: left padding
N = 20


@pytest.fixture(scope="module", params=list(BUILDERS))
def lm(request, tmp_path_factory):
    build, config = BUILDERS[request.param]
    return kvgen.load(build(tmp_path_factory.mktemp(request.param), **config), dtype="float32")


def greedy(lm, cache_kind: str, **options) -> list[list[int]]:
    prompts = [lm.encode(p) for p in PROMPTS]
    steps = list(generate_tokens(lm.model, prompts, N, cache_kind=cache_kind, **options))
    return torch.stack(steps, dim=1).tolist()


def test_replayed_steps_give_the_eager_tokens(lm, recorded_graphs):
    eager = greedy(lm, "static")  # the loop's own plain decode
    assert not recorded_graphs
    assert greedy(lm, "static", decoder=lm.runner.decoder) == eager
    (graph,) = recorded_graphs
    assert graph.replays == N - 2  # step 1 warm-up (eager), step 2 recorded, every later one replayed
    assert len({tuple(row) for row in eager}) > 1 and all(len(set(row)) > 2 for row in eager)  # not degenerate
    assert greedy(lm, "dynamic", decoder=lm.runner.decoder) == greedy(lm, "dynamic")  # never recorded: it grows
    assert len(recorded_graphs) == 1


def test_a_step_that_reads_a_changing_python_number_drifts(lm, recorded_graphs, monkeypatch):
    """The stand-in's own check: a static cache that wrote at a Python index, as it once did, is
    right when eager and wrong when replayed, because every replay writes the recorded slot."""
    from kvgen.cache import StaticLayerCache

    def write_at_python_index(self, keys, values, positions, skipped=0):
        if "python_index" not in self.__dict__:
            self.python_index = self.index  # read once, in the eager first step
        start = self.python_index
        self.keys[:, :, start : start + 1] = keys
        self.values[:, :, start : start + 1] = values
        self.positions[:, start : start + 1] = positions
        self.python_index += 1  # runs while recording, never in a replay
        self.written.add_(1)

    eager = greedy(lm, "static")
    monkeypatch.setattr(StaticLayerCache, "_write", write_at_python_index)
    assert greedy(lm, "static") == eager
    assert greedy(lm, "static", decoder=lm.runner.decoder) != eager


def test_decode_step_has_no_host_sync(lm, as_on_a_gpu):
    """Recording a decode step over a static cache meets no operator that reads the device on the host."""
    cache = make_cache("static", lm.model.cache_layout(), 1, 16, torch.float32)
    tokens = torch.tensor([[5, 6, 7]])
    prefill(lm.model, tokens, torch.arange(3)[None], cache)
    graph = RecordedGraph()
    with graph.record():
        logits = decode_one(lm.model, torch.tensor([8]), torch.tensor([3]), cache)
    assert logits.shape == (1, lm.model.lm_head.out_features) and graph.calls
