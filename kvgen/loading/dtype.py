"""Choosing the default dtype by measuring this machine, not by a constant.

Batch-1 decoding is bound by how fast the weights stream through matrix-vector products. Which
dtype streams faster per token differs between processors (bfloat16 halves the bytes, but some
CPUs run its kernels at a fraction of float32's bandwidth), so kvgen times both once per
processor and remembers the answer in the kvgen cache.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Large enough to stream from memory rather than cache (64 MB in float32), small enough to take ~0.1 s.
ROWS, COLS = 4096, 4096


def _seconds_per_matvec(dtype: torch.dtype, repeats: int = 5) -> float:
    weight = torch.randn(ROWS, COLS).to(dtype)
    x = torch.randn(1, COLS).to(dtype)
    F.linear(x, weight)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            F.linear(x, weight)
        best = min(best, (time.perf_counter() - start) / 4)
    return best


# The instruction-set features that decide which bfloat16 and float32 kernels a CPU gets.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_name_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and instruction-set flags, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


def _processor() -> str:
    """The CPU's model name and the features that matter here: the name alone ("AMD EPYC") can
    cover processors with and without AVX-512 bfloat16 instructions."""
    name, flags = cpu_name_and_flags()
    return " ".join([name, *(f for f in FEATURES if f in flags)])


def fastest_dtype(device: torch.device | str = "cpu", cache_dir: Path | None = None) -> torch.dtype:
    """bfloat16 on a GPU; on a CPU whichever of float32 and bfloat16 decodes faster, measured once."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    from .convert import cache_root

    key = f"{_processor()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    record = cache_root(cache_dir) / "fastest-dtype.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        fp32, bf16 = _seconds_per_matvec(torch.float32), _seconds_per_matvec(torch.bfloat16)
        known[key] = {"dtype": "bfloat16" if bf16 < fp32 else "float32", "float32_s": fp32, "bfloat16_s": bf16}
        try:  # a cache we cannot write only means measuring again next time
            record.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=record.parent, delete=False, suffix=".tmp") as f:
                json.dump(known, f, indent=2)
            os.replace(f.name, record)
        except OSError:
            pass
    return getattr(torch, known[key]["dtype"])


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """ "auto" -> `fastest_dtype(device)`; a name or torch dtype -> that dtype."""
    from . import parse_dtype

    return fastest_dtype(device) if dtype == "auto" else parse_dtype(dtype)
