"""The compiled decode step (`kvgen.compiled`): each layer's pure steps built once with AOTInductor,
kept in the kvgen cache, loaded by later processes without compiling, rebuilt when damaged; the
same greedy tokens as the layers as written, and a batch's rows the same as alone.

One small Llama (bfloat16, int4 weights: kvgen's default path) is compiled once for the module,
into its own cache; the rest of the suite runs with KVGEN_COMPILE=off (conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import kvgen
from kvgen import compiled
from kvgen.generate import generate_tokens
from kvgen.models.layers import Block
from kvgen.quant import int4_available
from kvgen.testing import build_llama

pytestmark = pytest.mark.skipif(not int4_available(), reason="this torch build has no CPU int4 kernel")

SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=2)
TEXTS = ["It was the best of times", "it was the worst of times, it was the age of wisdom, it was", "the age"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, kvgen cache) with the model's layers compiled into the cache."""
    folder = build_llama(tmp_path_factory.mktemp("llama"), scale=1.0, **SHAPE)
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVGEN_CACHE", str(cache))
        mp.setenv("KVGEN_COMPILE", "on")
        assert load(folder).runner.compiled == "compiled layers"
    return folder, cache


@pytest.fixture
def env(setup, monkeypatch):
    folder, cache = setup
    monkeypatch.setenv("KVGEN_CACHE", str(cache))
    monkeypatch.setenv("KVGEN_COMPILE", "on")
    return folder, cache


def load(folder: Path) -> kvgen.LM:
    return kvgen.load(folder, dtype="bfloat16", quantize="int4")


def greedy(lm: kvgen.LM, prompts: list[list[int]], steps: int = 16) -> Tensor:
    return torch.stack(list(generate_tokens(lm.model, prompts, steps, decoder=lm.runner.decoder)), 1)


def libraries(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (cache / "compiled").rglob("*.pt2")}


def test_compiled_layers_decode_the_tokens_of_the_layers_as_written(env, monkeypatch):
    folder, _ = env
    lm = load(folder)
    block = next(m for m in lm.model.modules() if isinstance(m, Block))
    assert isinstance(block.heads, compiled.CompiledPart) and isinstance(block.finish, compiled.CompiledPart)
    monkeypatch.setenv("KVGEN_COMPILE", "off")
    eager = load(folder)
    assert eager.runner.compiled == "not compiled (KVGEN_COMPILE=off)"
    ids = lm.encode(TEXTS[1])
    fast, want = greedy(lm, [ids], 24), greedy(eager, [ids], 24)
    assert len(set(want[0].tolist())) > 3  # not one token repeated
    assert torch.equal(fast, want)
    with torch.inference_mode():  # one decode step's logits: the same up to bfloat16's rounding
        x = torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None]
        got, ref = (
            m.model(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids) - 1]]), cache(m, x)) for m in (lm, eager)
        )
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def cache(lm: kvgen.LM, prompt: tuple[Tensor, Tensor]):
    from kvgen.cache import make_cache

    layers = make_cache("dynamic", lm.model.cache_layout(), 1, 64, lm.dtype)
    lm.model(*prompt, layers)  # a prompt of several positions: the layers as written
    return layers


def test_compiled_rows_decode_as_alone(env):
    """The compiled steps compute each row on its own, and attention stays per row: a batch's rows
    (unlike lengths, left-padded) are the rows run alone."""
    lm = load(env[0])
    prompts = [lm.encode(t) for t in TEXTS]
    together = greedy(lm, prompts).tolist()
    assert together == [greedy(lm, [p])[0].tolist() for p in prompts]


def test_a_second_process_loads_the_kept_libraries_without_compiling(env):
    folder, cache = env
    before = libraries(cache)
    assert before and all(p.stat().st_size < 10 << 20 for p in before)  # code only: the weights are arguments
    code = f"import kvgen; print(kvgen.load({str(folder)!r}, dtype='bfloat16', quantize='int4').runner.compiled)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "compiled layers"
    assert "compiling" not in run.stderr
    assert libraries(cache) == before


def test_a_damaged_library_is_rebuilt_and_stale_ones_pruned(env, capfd):
    folder, cache = env
    damaged = sorted(libraries(cache))[0]
    damaged.write_bytes(b"not a package" * 100)
    stale = damaged.parent.parent / "an-older-torch" / "heads-0.pt2"  # this model's, an older build's
    other = cache / "compiled" / "another-model" / "a-build" / "heads-0.pt2"
    for path in (stale, other):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"old")
    lm = load(folder)
    assert lm.runner.compiled == "compiled layers"
    assert capfd.readouterr().err.count("compiling a decode step's") == 1  # that library alone
    assert damaged.stat().st_size > 10_000
    assert not stale.parent.exists() and other.exists()
    ids = lm.encode(TEXTS[0])
    assert torch.equal(greedy(lm, [ids]), greedy(load(folder), [ids]))


def test_a_slower_compiled_step_is_not_used_and_the_verdict_is_kept(env, monkeypatch):
    """Where the compiled parts time slower than the eager ones, the layers stay as written; the
    verdict is kept, so later loads neither time nor compile again."""
    folder, _ = env
    monkeypatch.setenv("KVGEN_COMPILE", "auto")
    monkeypatch.setenv("KVGEN_CACHE", str(Path(env[1]) / "other"))  # a fresh verdict over new libraries
    monkeypatch.setattr(compiled, "_time_layers", lambda layers: (1.0, 2.0))
    lm = load(folder)
    assert lm.runner.compiled.startswith("not compiled (slower here: 2000.00 against 1000.00 ms")
    block = next(m for m in lm.model.modules() if isinstance(m, Block))
    assert "heads" not in vars(block)  # the class's own method

    def fail(*args):
        raise AssertionError("built or timed again")

    monkeypatch.setattr(compiled, "_time_layers", fail)
    monkeypatch.setattr(compiled, "_compile", fail)
    monkeypatch.setattr(compiled, "_export", fail)
    assert load(folder).runner.compiled == lm.runner.compiled


def test_a_build_that_fails_is_recorded_once(env, monkeypatch, tmp_path):
    folder, _ = env
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    calls = []

    def no_compiler(*args):
        calls.append(args)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled, "_compile", no_compiler)
    for _ in range(2):
        lm = load(folder)
        assert lm.runner.compiled.startswith(
            "not compiled (cannot compile: RuntimeError: no C++ compiler found; delete"
        )
    assert len(calls) == 1
    ids = lm.encode(TEXTS[0])
    assert len(greedy(lm, [ids])[0]) == 16  # the layers as written still run


def test_a_new_torch_or_processor_gets_its_own_libraries(env, monkeypatch):
    blocks = [m for m in load(env[0]).model.modules() if isinstance(m, Block)]
    signatures = [compiled._signature(b) for b in blocks]
    folder = compiled._folder(blocks, signatures)
    with monkeypatch.context() as patch:
        patch.setattr(compiled.torch, "__version__", "9.9.9")
        assert compiled._folder(blocks, signatures).parent == folder.parent
        assert compiled._folder(blocks, signatures) != folder
    with monkeypatch.context() as patch:
        patch.setattr(compiled, "cpu_name_and_flags", lambda: ("another CPU", {"avx2"}))
        assert compiled._folder(blocks, signatures).parent == folder.parent
        assert compiled._folder(blocks, signatures) != folder
    assert compiled._folder(blocks, signatures) == folder


def test_an_unknown_setting_is_a_clear_error(env, monkeypatch, cli):
    monkeypatch.setenv("KVGEN_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="KVGEN_COMPILE='sometimes': choose one of auto, on, off"):
        load(env[0])
    code, out, err = cli("generate", "-m", env[0], "-n", "2", "hello")
    assert code == 2 and "KVGEN_COMPILE='sometimes'" in err and "Traceback" not in err


class StrayTensor(Block):
    """A layer whose step reads a tensor that is neither a parameter nor a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8
        self.proj = nn.Linear(8, 24)
        self.stray = torch.ones(8)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(self.proj(x * self.stray).view(x.shape[0], 1, 3, 8).unbind(2))

    def finish(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y


def test_a_layer_reading_a_stray_tensor_is_refused():
    """A compiled library serves every layer of its shape with that layer's own tensors; one that
    baked a tensor in would give every layer the first one's."""
    with pytest.raises(ValueError, match="not its parameters or buffers"):
        compiled._export(StrayTensor(), "heads")
