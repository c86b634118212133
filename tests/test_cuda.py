"""The same code on a GPU: skipped where CUDA is not (CI never has it; a device session runs it).

Recorded-and-replayed decode steps (`kvgen.graphs`) must give the eager loop's greedy tokens on the
GPU, for every family, batched with left padding, and the eager GPU loop the CPU's (float32, where
the two devices compute the same maths up to summation order)."""

import pytest
import torch

from kvgen import graphs
from kvgen.generate import generate_tokens
from kvgen.loading import load_native
from kvgen.runner import Runner
from kvgen.testing import build_gemma3, build_gpt2, build_llama, build_qwen3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BUILDERS = {
    "gpt2": (build_gpt2, {}),
    "llama": (build_llama, dict(num_key_value_heads=2)),
    "qwen3": (build_qwen3, dict(num_key_value_heads=2)),
    "gemma3-sliding": (build_gemma3, dict(num_key_value_heads=1, sliding_window=6)),
}
PROMPTS = [[5, 9, 3, 7, 11, 2], [4, 8, 1], [6]]
N = 20


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory):
    build, config = BUILDERS[request.param]
    return build(tmp_path_factory.mktemp(request.param), **config)


def greedy(model, cache_kind: str, **options) -> list[list[int]]:
    steps = list(generate_tokens(model, PROMPTS, N, cache_kind=cache_kind, **options))
    return torch.stack(steps, dim=1).tolist()


def test_graph_replays_give_the_eager_tokens(folder, monkeypatch):
    model = load_native(folder, torch.float32, "cuda")
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    recorded = []
    monkeypatch.setattr(graphs.GraphDecoder, "__init__", _counting(graphs.GraphDecoder.__init__, recorded))
    eager = greedy(model, "static")  # the loop's plain decode
    assert not recorded
    assert greedy(model, "static", decoder=Runner().decoder) == eager  # the runner's: a CUDA graph
    assert len(recorded) == 1
    assert greedy(model, "dynamic", decoder=Runner().decoder) == eager  # never recorded (it grows)
    assert greedy(load_native(folder, torch.float32, "cpu"), "static") == eager


def _counting(init, calls):
    def wrapped(self, *args, **kwargs):
        calls.append(self)
        init(self, *args, **kwargs)

    return wrapped
