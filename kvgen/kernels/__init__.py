"""kvgen's own CPU kernels, built once per machine from the C++ beside this file.

torch's kernels come first; one of ours exists only where torch's was measured to be the limit
(docs/speed.md). Each is compiled for this processor the first time it is wanted (seconds, with
the compiler torch's extensions use), kept in the kvgen cache by the source, the torch version and
the processor, and loaded from there by later processes. Where it cannot be built (no compiler, a
CPU without the instructions it needs), `load` says why and callers keep torch's kernel.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
# What each kernel needs of the CPU (its /proc/cpuinfo flags) and the compiler flags that allow it.
KERNELS = {
    "int4_mm": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "avx512_vnni"),
        ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi", "-mavx512vnni", "-fopenmp"],
    ),
    "attention": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
        ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"],
    ),
}


def _library(name: str, cflags: list[str]) -> Path:
    """Where the built kernel is kept: named by its source, flags, torch and processor."""
    from ..loading.convert import cache_root
    from ..loading.dtype import cpu_name_and_flags

    cpu, flags = cpu_name_and_flags()
    key = hashlib.sha256(
        b"\0".join(
            [(HERE / f"{name}.cpp").read_bytes(), " ".join(cflags).encode(), torch.__version__.encode(), cpu.encode()]
            + [f.encode() for f in sorted(flags)]
        )
    ).hexdigest()[:16]
    return cache_root() / "kernels" / f"{name}-{key}.so"


def _build(name: str, cflags: list[str], target: Path) -> None:
    """Compile the kernel in a scratch folder and load it, then move it into place for later
    processes (never a half-written library where another process looks)."""
    from torch.utils.cpp_extension import load

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building kvgen's {name} kernel for this CPU (once, ~10 s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = load(  # and loads it: torch.ops.kvgen.<name> is callable from here on
            name=f"kvgen_{name}",
            sources=[str(HERE / f"{name}.cpp")],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],  # torch's own libgomp, already loaded: one thread pool
            build_directory=scratch,
            is_python_module=False,
        )
        os.replace(built, target)
    for stale in target.parent.glob(f"{name}-*.so"):  # built from an older source, torch or CPU
        if stale != target:
            stale.unlink(missing_ok=True)


def _int4_mm_shape(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[1])  # (M, K) times (terms, N, K/2) nibbles -> (M, N)


def _attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    return q.new_empty(q.shape)  # (B, H, T, D) queries -> their (B, H, T, D) attention


# Each kernel's output shape and dtype for its inputs: what tracing (`kvgen.compiled`) needs of an op.
SHAPES = {"int4_mm": _int4_mm_shape, "attention": _attention_shape}


def _register_shape(name: str) -> None:
    torch.library.register_fake(f"kvgen::{name}")(SHAPES[name])


@functools.cache
def load(name: str) -> str | None:
    """Make torch.ops.kvgen.<name> callable: None when it is, else why it cannot be."""
    from ..loading.dtype import cpu_name_and_flags

    needs, cflags = KERNELS[name]
    missing = [flag for flag in needs if flag not in cpu_name_and_flags()[1]]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    target = _library(name, cflags)
    failed = target.with_suffix(".failed")  # why the last build failed: not tried again by every process
    if failed.is_file():
        return failed.read_text()
    try:
        torch.ops.load_library(str(target))
        _register_shape(name)
        return None
    except OSError:  # not built yet, or damaged: built (again)
        target.unlink(missing_ok=True)
    try:
        _build(name, cflags, target)
        _register_shape(name)
        return None
    except Exception as e:  # no compiler, a compile error: torch's kernel stays
        lines = str(e).strip().splitlines()
        why = f"it could not be built ({type(e).__name__}{': ' + lines[-1] if lines else ''}; {failed} holds this)"
        try:  # under a temporary name, then renamed: never a half-written reason
            partial = failed.with_suffix(".failed-partial")
            partial.write_text(why)
            os.replace(partial, failed)
        except OSError:
            pass
        return why
