"""A decode step's pure parts, compiled ahead of time for this machine, kept and reused.

The weight products of a decode step run at memory speed (`kvgen.quant`, `kvgen.kernels`); what
else a step costs is a hundred small ops (norms, residual adds, activations, reshapes), each a
kernel call with Python around it: on two cores, as much again as the products (docs/speed.md).
AOTInductor compiles a layer's two pure steps, `heads` and `finish` (`models.layers.Block`), into
one C++ function each that takes the layer's tensors as arguments, so one library serves every
layer whose step traces to the same program, at any batch size. They are built once per model,
torch, kvgen source and processor (seconds per library, announced), kept in the kvgen cache and
loaded by later processes in milliseconds. Attention and the cache stay as written: a row's numbers do not depend on what
else is in its batch, and a step of several positions (a prompt, speculative verification) runs
the layers as written.

The compiled parts are kept only where they are faster: at build time they are timed against the
eager ones and the verdict is kept beside them. A library that fails to load, or disagrees with
the eager layer when loaded, is rebuilt; where none can be built (no compiler, a layer export
cannot trace), that is recorded once and the layers stay eager. `KVGEN_COMPILE=off` skips all of
it; `KVGEN_COMPILE=on` uses the compiled parts even where they were measured slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from . import kernels
from .loading.convert import cache_root
from .loading.dtype import cpu_name_and_flags
from .models.layers import Block

PARTS = ("heads", "finish")
SETTINGS = ("auto", "on", "off")  # KVGEN_COMPILE: where measured faster, always, never
MAX_ROWS = 256  # batch sizes a library takes; a larger batch runs the layers as written
EXAMPLE_ROWS = 2  # export treats a dimension of 1 as fixed: the example batch has two rows
# The kvgen source a traced step runs through, besides the model's own file: part of every build's key.
SOURCES = ("compiled.py", "quant.py", "fast.py", "models/layers.py", "kernels/int4_mm.cpp")


def speed_up(model: nn.Module) -> str:
    """Swap compiled `heads` and `finish` into `model`'s layers where that was measured faster on
    this machine; returns what was done: "compiled layers", or why the layers stay as written."""
    setting = os.environ.get("KVGEN_COMPILE", "").lower() or "auto"
    if setting not in SETTINGS:
        raise ValueError(f"KVGEN_COMPILE={setting!r}: choose one of {', '.join(SETTINGS)}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if setting == "off":
        return "not compiled (KVGEN_COMPILE=off)"
    if not blocks or next(model.parameters()).device.type != "cpu":
        return "not compiled (CPU models only)"
    kernels.load("int4_mm")  # its op, where this CPU has it, must exist before a layer is traced
    signatures = [_signature(b) for b in blocks]
    folder = _folder(blocks, signatures)
    verdict = _read_json(folder / "verdict.json") or {}
    if verdict.get("cannot") or (verdict.get("slower") and setting != "on"):
        return f"not compiled ({verdict.get('cannot') or verdict['slower']})"
    try:
        parts = _libraries(blocks, signatures, folder)
    except Exception as e:  # no compiler, an op export cannot trace: recorded, not retried
        why = f"{type(e).__name__}: {_first_line(e)}; delete {folder / 'verdict.json'} to try again"
        verdict = {"cannot": f"cannot compile: {why}"}
        _write_json(folder / "verdict.json", verdict)
        return f"not compiled ({verdict['cannot']})"
    layers = [(b, _tensors(b), parts[sig, "heads"], parts[sig, "finish"]) for b, sig in zip(blocks, signatures)]
    if not verdict:
        verdict = _measure(layers)
        _write_json(folder / "verdict.json", verdict)
    if verdict["slower"] and setting != "on":
        return f"not compiled ({verdict['slower']})"
    for block, tensors, heads, finish in layers:
        block.heads = CompiledPart(heads, tensors, block.heads, _dtype(block))
        block.finish = CompiledPart(finish, tensors, block.finish, _dtype(block))
    return "compiled layers"


class CompiledPart:
    """One of a layer's pure steps as a compiled library called with the layer's own tensors.

    Steps of one position per row take the library; any other (a prompt's many positions, an input
    of another dtype than it was compiled for) takes the layer's own method, which the library was
    compiled from."""

    def __init__(self, library, tensors: list[Tensor], eager, dtype: torch.dtype) -> None:
        self.library, self.tensors, self.eager, self.dtype = library, tensors, eager, dtype

    def __call__(self, x: Tensor, *rest: Tensor):
        if x.shape[1] != 1 or x.shape[0] > MAX_ROWS or x.dtype != self.dtype:
            return self.eager(x, *rest)
        out = self.library.run([*self.tensors, x.contiguous(), *(t.contiguous() for t in rest)])
        return out[0] if len(out) == 1 else tuple(out)


def _named(block: Block) -> dict[str, Tensor]:
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


def _names(block: Block) -> list[str]:
    """The layer's parameters and buffers by name, in the order its libraries take them."""
    return sorted(_named(block))


def _tensors(block: Block) -> list[Tensor]:
    named = _named(block)
    return [named[name] for name in _names(block)]


def _signature(block: Block) -> str:
    """What a library compiled from `block` depends on: its class, its tensors' names, shapes and
    dtypes, and every plain setting of its modules (norm epsilons, kernel choices, sizes)."""
    tensors = [(name, tuple(t.shape), str(t.dtype)) for name, t in sorted(_named(block).items())]
    settings = [
        (name, key, repr(value))
        for name, module in block.named_modules()
        for key, value in sorted(vars(module).items())
        if isinstance(value, (bool, int, float, str, tuple, type(None))) and key != "training"
    ]
    return _hash([repr((type(block).__qualname__, block.width, tensors, settings)).encode()])[:16]


def _folder(blocks: list[Block], signatures: list[str]) -> Path:
    """Where a model's libraries live: by its layers' signatures, then by what built them (the
    code, torch and the processor). A new build prunes the older builds beside it."""
    here = Path(__file__).parent
    sources = {here / name for name in SOURCES} | {Path(inspect.getfile(type(b))) for b in blocks}
    cpu, flags = cpu_name_and_flags()
    build = [p.read_bytes() for p in sorted(sources)] + [torch.__version__.encode(), cpu.encode()]
    build += [f.encode() for f in sorted(flags)]
    model = sorted({sig.encode() for sig in signatures})
    return cache_root() / "compiled" / _hash(model) / _hash(build)


def _hash(parts: list[bytes]) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _libraries(blocks: list[Block], signatures: list[str], folder: Path) -> dict[tuple[str, str], object]:
    """(signature, part) -> a loaded library for each kind of layer in `blocks`, checked against
    that kind's first layer. Libraries are named by the program they compile, so kinds of layer
    whose steps trace alike (Gemma's sliding and global layers) share one; `index.json` says
    which kind takes which, so a later load neither traces nor compiles."""
    kinds = dict(reversed(list(zip(signatures, blocks))))  # the first layer of each kind
    index = _read_json(folder / "index.json") or {}
    libraries, loaded, built = {}, {}, 0
    for sig, block in kinds.items():
        for part in PARTS:
            name = index.get(f"{part}-{sig}")
            library = _load_checked(folder / name, block, part, loaded) if name else None
            if library is None:
                program = _export(block, part)
                name = index[f"{part}-{sig}"] = f"{part}-{_program_key(program)}.pt2"
                library = _load_checked(folder / name, block, part, loaded)
            if library is None:
                built += 1
                print(
                    f"compiling a decode step's {part} for this CPU (library {built}, once)",
                    file=sys.stderr,
                    flush=True,
                )
                _compile(program, folder / name)
                library = _load_checked(folder / name, block, part, loaded)
                if library is None:
                    raise RuntimeError(f"{name} disagrees with the layer it was compiled from")
            libraries[sig, part] = loaded[name] = library
    _write_json(folder / "index.json", index)
    if built:
        _prune_older_builds(folder)
    return libraries


def _prune_older_builds(folder: Path) -> None:
    """Remove the libraries that an older kvgen, torch or processor built for this model."""
    for stale in folder.parent.iterdir():
        if stale != folder and stale.is_dir():
            for f in stale.iterdir():
                f.unlink(missing_ok=True)
            stale.rmdir()


def _dtype(block: Block) -> torch.dtype:
    """The dtype of a layer's input: its weights' (the model's) dtype."""
    return next(block.parameters()).dtype


def _example(block: Block, part: str, rows: int) -> tuple[Tensor, ...]:
    """Inputs for `part` of `block`, `rows` rows of one position, values of a layer's scale."""
    x = torch.randn(rows, 1, block.width, generator=torch.Generator().manual_seed(0)).to(_dtype(block))
    if part == "heads":
        return (x,)
    q, _, _ = type(block).heads(block, x)  # the class's own: a compiled one may already be in place
    return x, torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)


class _Step(nn.Module):
    """A layer whose forward is one of its pure steps (the class's own, never a compiled one)."""

    def __init__(self, block: Block, part: str) -> None:
        super().__init__()
        self.layer, self.part = block, part

    def forward(self, *inputs: Tensor):
        return getattr(type(self.layer), self.part)(self.layer, *inputs)


class _Traced(nn.Module):
    """What export traces: one pure step of a layer, with the layer's tensors as arguments."""

    def __init__(self, block: Block, part: str) -> None:
        super().__init__()
        object.__setattr__(self, "step", _Step(block, part))  # not a submodule: no tensor becomes a constant
        self.names = ["layer." + name for name in _names(block)]

    def forward(self, tensors: list[Tensor], *inputs: Tensor):
        return torch.func.functional_call(self.step, dict(zip(self.names, tensors)), inputs, tie_weights=False)


@contextlib.contextmanager
def _tracing():
    """Where export and AOTInductor run: no autograd, and torch's own deprecation warnings, raised
    inside them, kept from the user."""
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _export(block: Block, part: str) -> torch.export.ExportedProgram:
    """`part` of `block` as a graph whose arguments are the layer's tensors and its inputs, with a
    dynamic batch."""
    inputs, tensors = _example(block, part, EXAMPLE_ROWS), [t.detach() for t in _tensors(block)]  # no autograd
    rows = torch.export.Dim("rows", min=1, max=MAX_ROWS)
    with _tracing():
        program = torch.export.export(
            _Traced(block, part),
            (tensors, *inputs),
            dynamic_shapes=([None] * len(tensors), tuple({0: rows} for _ in inputs)),  # forward's *inputs: one tuple
            strict=False,
        )
    if program.constants or program.state_dict:  # one layer's tensor baked in would serve every layer
        raise ValueError(f"{type(block).__qualname__}.{part} reads tensors that are not its parameters or buffers")
    return program


def _program_key(program: torch.export.ExportedProgram) -> str:
    """A name for what a program computes: its code and its arguments' shapes and dtypes."""
    args = [
        (tuple(n.meta["val"].shape), str(n.meta["val"].dtype)) for n in program.graph.nodes if n.op == "placeholder"
    ]
    return _hash([program.graph_module.code.encode(), repr(args).encode()])


def _compile(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor's package of `program`, moved into place (never a half-written one where a
    process looks)."""
    import torch._inductor  # about a second to import: only when something is built

    path.parent.mkdir(parents=True, exist_ok=True)
    with _tracing(), tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(scratch) / path.name))
        os.replace(built, path)


def _load(path: Path):
    """A compiled package, through torch's loader directly: `torch._inductor.aoti_load_package`
    would first import the compiler (a second) to wrap the same object."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)


def _load_checked(path: Path, block: Block, part: str, loaded: dict):
    """The library at `path` (from `loaded`, by name, if this load has it already) if it loads and
    computes what `block` does; else None, and a damaged or wrong file is removed."""
    if path.name not in loaded and not path.is_file():
        return None
    try:
        library = loaded.get(path.name) or _load(path)
        inputs = _example(block, part, 1)
        with torch.inference_mode():
            got = library.run([*_tensors(block), *inputs])
            want = getattr(type(block), part)(block, *inputs)
        want = want if isinstance(want, tuple) else (want,)
        if len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want)):
            return library
    except Exception:  # damaged, or built by another torch: built again
        pass
    path.unlink(missing_ok=True)
    return None


def _close(got: Tensor, want: Tensor) -> bool:
    """Equal up to the rounding of the dtype: compiled code fuses, and so rounds, differently."""
    tolerance = 1e-4 if want.dtype == torch.float32 else 3e-2
    scale = want.float().abs().max().clamp(min=1e-6)
    return got.shape == want.shape and bool(((got.float() - want.float()).abs().max() / scale) <= tolerance)


def _measure(layers: list) -> dict:
    """The verdict kept beside the libraries: both timings, and why not, where they are slower."""
    eager_s, compiled_s = _time_layers(layers)
    slower = f"slower here: {compiled_s * 1e3:.2f} against {eager_s * 1e3:.2f} ms a step's layers"
    return {
        "eager_ms": eager_s * 1e3,
        "compiled_ms": compiled_s * 1e3,
        "slower": slower if compiled_s >= eager_s else None,
    }


def _time_layers(layers: list) -> tuple[float, float]:
    """Seconds for one decode step's `heads` and `finish` over every layer (block, tensors, heads
    library, finish library), eager and compiled, best of alternating rounds."""
    inputs = [(_example(b, "heads", 1), _example(b, "finish", 1)) for b, *_ in layers]

    def eager() -> None:
        for (block, *_), (heads_inputs, finish_inputs) in zip(layers, inputs):
            block.heads(*heads_inputs)
            block.finish(*finish_inputs)

    def compiled() -> None:
        for (_, tensors, heads, finish), (heads_inputs, finish_inputs) in zip(layers, inputs):
            heads.run([*tensors, *heads_inputs])
            finish.run([*tensors, *finish_inputs])

    best = {eager: float("inf"), compiled: float("inf")}
    with torch.inference_mode():
        for _ in range(5):
            for run in best:
                start = time.perf_counter()
                run()
                best[run] = min(best[run], time.perf_counter() - start)
    return best[eager], best[compiled]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    """Under a temporary name, then renamed; a cache that cannot be written only means measuring again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, path)
    except OSError:
        pass


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]
