"""Choosing the default dtype by measuring this machine, not by a constant.

Batch-1 decoding is bound by how fast the weights stream through matrix-vector products. Which
dtype streams faster per token differs between processors (bfloat16 halves the bytes, but some
CPUs run its kernels at a fraction of float32's bandwidth), so kvgen times both once per
processor and remembers the answer in the kvgen cache.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Large enough to stream from memory rather than cache (64 MB in float32), small enough to take ~0.1 s.
ROWS, COLS = 4096, 4096


def _seconds_per_matvec(dtype: torch.dtype, kernel: str = "", repeats: int = 5) -> float:
    """Best time of one (1, COLS) x (COLS, ROWS) product: through `F.linear`; "_packed" through
    oneDNN's prepacked kernel (`kvgen.fast`); "_int4" or "_int8" through torch's weight-only
    kernels over quantized weights (`kvgen.quant`); "_int4_kvgen" through kvgen's own int4 kernel
    (`kvgen.kernels`)."""
    from ..fast import pack, packed_linear
    from ..quant import QuantLinear

    weight = torch.randn(ROWS, COLS).to(dtype)
    x = torch.randn(1, COLS).to(dtype)
    if kernel == "_packed":
        weight = pack(weight)
        product = lambda: packed_linear(x, weight, None)  # noqa: E731
    elif kernel.startswith(("_int4", "_int8")):
        product = QuantLinear.quantize(weight, kernel[1:5])
        product.set_kernel("kvgen" if kernel.endswith("_kvgen") else "torch")
    else:
        product = lambda: F.linear(x, weight)  # noqa: E731
    if isinstance(product, QuantLinear):
        quantized = product
        product = lambda: quantized(x)  # noqa: E731
    product()  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            product()
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


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_times(cache_dir: Path | None = None) -> dict:
    """This processor's matrix-vector times, measured once and remembered in the kvgen cache:
    `{"float32_s", "bfloat16_s", "float32_packed_s", ..., "bfloat16_int4_s", "bfloat16_int8_s"}`
    in seconds (packed where torch has oneDNN, int4 where it has that kernel), "bfloat16_int4_kvgen_s"
    where kvgen's own int4 kernel builds on this CPU, and `dtype`, the float dtype that decodes faster."""
    from .. import kernels
    from ..fast import packing_available
    from ..quant import int4_available
    from . import save_json
    from .convert import cache_root

    key = f"{_processor()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    record = cache_root(cache_dir) / "fastest-dtype.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    variants = ("", "_int8", *(("_packed",) if packing_available() else ()), *(("_int4",) if int4_available() else ()))
    wanted = {f"{str(d).removeprefix('torch.')}{kernel}_s" for d in KERNEL_DTYPES for kernel in variants}
    if kernels.load("int4_mm") is None:  # bfloat16 inputs only
        wanted.add("bfloat16_int4_kvgen_s")
    if not wanted <= known.get(key, {}).keys():  # never measured, or before a kernel was added
        times, best = {}, {}
        threads = torch.get_num_threads()
        # Timed on one thread: these compare kernels, and a busy machine that deschedules one of
        # two threads makes every two-thread call wait a time slice (8 ms: all kernels alike).
        torch.set_num_threads(1)
        try:
            for dtype in KERNEL_DTYPES:
                name = str(dtype).removeprefix("torch.")
                for kernel in variants + (("_int4_kvgen",) if f"{name}_int4_kvgen_s" in wanted else ()):
                    times[f"{name}{kernel}_s"] = _seconds_per_matvec(dtype, kernel)
                best[name] = min(times[f"{name}_s"], times.get(f"{name}_packed_s", float("inf")))
        finally:
            torch.set_num_threads(threads)
        known[key] = {"dtype": min(best, key=best.get), **times}
        save_json(record, known)  # a record we cannot write only means measuring again next time
    return known[key]


def _best_quantized_s(times: dict, name: str) -> float:
    return min(times.get(f"{name}_{kernel}_s", float("inf")) for kernel in ("int4", "int8", "int4_kvgen"))


def int4_kernel(dtype: torch.dtype, device: torch.device | str = "cpu", cache_dir: Path | None = None) -> str:
    """Whose int4 kernel multiplies `dtype` rows faster on this CPU, measured once: "kvgen" (its
    own, `kvgen.kernels`) or "torch"."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return "torch"
    times = kernel_times(cache_dir)
    return (
        "kvgen"
        if times.get("bfloat16_int4_kvgen_s", float("inf")) < times.get("bfloat16_int4_s", float("inf"))
        else "torch"
    )


def fastest_dtype(
    device: torch.device | str = "cpu", cache_dir: Path | None = None, quantized: bool = False
) -> torch.dtype:
    """bfloat16 on a GPU; on a CPU whichever of float32 and bfloat16 decodes faster, by its
    faster kernel, measured once. For `quantized` weights, by their kernels where those pay."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    times = kernel_times(cache_dir)
    paying = [d for d in KERNEL_DTYPES if quantized and quantized_pays(d, device, cache_dir)]
    if paying:
        return min(paying, key=lambda d: _best_quantized_s(times, str(d).removeprefix("torch.")))
    return getattr(torch, times["dtype"])


def packing_pays(dtype: torch.dtype, device: torch.device | str = "cpu", cache_dir: Path | None = None) -> bool:
    """Whether oneDNN's prepacked kernel multiplies `dtype` weights faster than `F.linear` on this
    CPU (measured once); never on other devices."""
    if torch.device(device).type != "cpu" or dtype not in KERNEL_DTYPES:
        return False
    times, name = kernel_times(cache_dir), str(dtype).removeprefix("torch.")
    return times.get(f"{name}_packed_s", float("inf")) < times[f"{name}_s"]


def quantized_pays(dtype: torch.dtype, device: torch.device | str = "cpu", cache_dir: Path | None = None) -> bool:
    """Whether torch's int4 or int8 weight-only kernel streams a weight faster than the best float
    kernel of `dtype` on this CPU (measured once: on an AVX2-only EPYC they were slower); never on
    other devices, where torch's quantized kernels want other layouts."""
    if torch.device(device).type != "cpu" or dtype not in KERNEL_DTYPES:
        return False
    times, name = kernel_times(cache_dir), str(dtype).removeprefix("torch.")
    return _best_quantized_s(times, name) < min(times[f"{name}_s"], times.get(f"{name}_packed_s", float("inf")))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu", quantized: bool = False) -> torch.dtype:
    """ "auto" -> `fastest_dtype(device, quantized=quantized)`; a name or torch dtype -> that dtype."""
    from . import parse_dtype

    return fastest_dtype(device, quantized=quantized) if dtype == "auto" else parse_dtype(dtype)
