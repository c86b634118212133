"""The conversion cache: a GGUF becomes a Hugging Face model folder once, then loads like any other.

    $KVGEN_CACHE (default ~/.cache/kvgen)/
      gemma-3-270m-q4_k_m-1f0c…-float32/   config.json, model.safetensors, tokenizer.json,
                                           tokenizer_config.json, generation_config.json,
                                           kvgen_conversion.json (where it came from)
      gemma-3-270m-q4_k_m-1f0c…-bfloat16-int4-v5/
                                           the same, but the quantized matrices stay quantized, as
                                           kvgen's int4/int8 kernels read them (kvgen_blocks.safetensors,
                                           kvgen.loading.blocks); model.safetensors holds the rest
      quantized/<key>-….safetensors        a float checkpoint's weights quantized (kvgen.runner)
      models/<name>.gguf                   models known by name, assembled from their packages

The folder is keyed by the file's content, the dtype and whether it keeps the quantized blocks, so
a renamed or moved file still hits it and a changed one does not. It is written under a temporary
name in the cache folder and renamed into place only when complete: a folder with the final name
is always whole, and an interrupted conversion leaves nothing the next load would mistake for one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from .blocks import BLOCKS_FILE, block_tensors, blocks_layout, keeps_quantized, quantize_plan
from .gguf import (
    GGUFFile,
    TensorPlan,
    check_magic,
    config_from_gguf,
    generation_eos_ids,
    save_tokenizer,
    tensor_chunks,
    tensor_plan,
)

CONVERTER_VERSION = 1  # bump when the output of a conversion changes, so old cache entries are redone
FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
RECORD = "kvgen_conversion.json"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# The content key reads the start of the file (header, metadata, vocabulary), its end and evenly
# spaced samples between: ~4 MiB whatever the file's size, 5 ms. Hashing all of the 253 MB Gemma
# 3 270M file takes 0.17 s (sha256) to 0.31 s (blake2b) from the page cache, more from disk, and
# grows with the file: a 5 GB model would pay seconds on every load.
HEAD_BYTES = 2 << 20
SAMPLES = 32
SAMPLE_BYTES = 64 << 10


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: `cache_dir`, else $KVGEN_CACHE, else ~/.cache/kvgen."""
    return Path(cache_dir or os.environ.get("KVGEN_CACHE") or Path.home() / ".cache" / "kvgen").expanduser()


def content_key(path: Path) -> str:
    """A hash of the file's size, first 2 MiB, last 64 KiB and 32 samples of 64 KiB between.

    Two GGUFs that differ anywhere in their metadata, or in the weights of any tensor that crosses
    a sample, get different keys; a quantised model's weights differ nearly everywhere from any
    other model's, so sampling is as good as hashing all of it here, at a fraction of the cost.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(struct.pack("<QI", size, CONVERTER_VERSION), digest_size=10)
    with open(path, "rb") as f:
        digest.update(f.read(HEAD_BYTES))
        for i in range(1, SAMPLES + 1):
            f.seek(max(0, size * i // (SAMPLES + 1) - SAMPLE_BYTES // 2))
            digest.update(f.read(SAMPLE_BYTES))
        f.seek(max(0, size - SAMPLE_BYTES))
        digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def cached_folder(
    path: str | Path, dtype: torch.dtype, cache_dir: str | Path | None = None, keep_blocks: bool = False
) -> Path:
    """The folder a conversion of `path` to `dtype` goes to (it may not exist yet).

    Named `<file stem>-<content key>-<dtype>[-<blocks layout>]` for people; found by key, dtype and
    layout alone, so a renamed or moved copy of a converted file is not converted again.
    """
    path = Path(path).expanduser()
    check_magic(path)
    suffix = f"-{content_key(path)}-{DTYPE_NAMES[dtype]}" + (f"-{blocks_layout()}" if keep_blocks else "")
    root = cache_root(cache_dir)
    if root.is_dir():
        for existing in root.glob(f"*{suffix}"):
            if not existing.name.startswith(".") and is_complete(existing, keep_blocks):
                return existing
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80]
    return root / f"{stem}{suffix}"


def is_complete(folder: Path, keep_blocks: bool = False) -> bool:
    """Whether `folder` holds a whole conversion (with `keep_blocks`, a readable blocks file too)."""
    if not all((folder / name).is_file() for name in FOLDER_FILES):
        return False
    if not keep_blocks:
        return True
    try:
        with safe_open(folder / BLOCKS_FILE, framework="pt"):  # reads the header: a truncated file fails
            return True
    except Exception:
        return False


def convert_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    keep_blocks: bool = False,
) -> Path:
    """The model folder for a GGUF file: converted on the first call, found in the cache after.

    With `keep_blocks`, the matrices kvgen's int4/int8 kernels can read stay quantized
    (`kvgen.loading.blocks`) and only the rest is dequantized to `dtype`: no float copy of the
    big weights is ever made. Raises FileNotFoundError for a missing file and ValueError for one
    that is not a GGUF kvgen can convert, or a cache folder it cannot write; in every case the
    cache holds nothing new.
    """
    path = Path(path).expanduser()
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot convert to {dtype}; choose one of: {', '.join(DTYPE_NAMES.values())}")
    final = cached_folder(path, dtype, cache_dir, keep_blocks)
    if is_complete(final, keep_blocks):
        return final
    start = time.perf_counter()
    target = f"{DTYPE_NAMES[dtype]}, keeping its quantized weights" if keep_blocks else DTYPE_NAMES[dtype]
    with Progress(f"{path.name} to {target}", progress) as bar:
        bar.phase("reading the header")
        g = GGUFFile(path)  # every check on the file happens before anything is written
        config = config_from_gguf(g)
        plan = tensor_plan(g, config)
        scratch = _make_scratch(final)
        try:
            if keep_blocks:
                plan = write_blocks(g, plan, dtype, scratch, bar)
            write_folder(g, config, plan, dtype, scratch, bar)
            _record(scratch, g, dtype, final, time.perf_counter() - start)
            if final.exists():  # incomplete (someone removed files from it): it is ours to replace
                shutil.rmtree(final)
            try:
                os.rename(scratch, final)
            except OSError:
                if not is_complete(final):  # not another process finishing the same conversion first
                    raise
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    shutil.rmtree(scratch, ignore_errors=True)  # left only if another process won the rename
    return final


def _make_scratch(final: Path) -> Path:
    """A fresh temporary folder next to `final` (the rename stays on one filesystem), after
    removing what earlier conversions of the same file left when their process died."""
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".partial-{final.name}-*"):
            pid = stale.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".partial-{final.name}-{os.getpid()}-", dir=root))
    except OSError as e:
        raise ValueError(
            f"cannot write to the kvgen cache folder {root} ({e.strerror or e}); set KVGEN_CACHE to a writable folder"
        ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_blocks(
    g: GGUFFile, plan: list[TensorPlan], dtype: torch.dtype, folder: Path, bar: Progress
) -> list[TensorPlan]:
    """The quantized matrices of `plan` as kvgen keeps them, into `folder`'s blocks file; returns
    the rest of the plan, the tensors still to dequantize."""
    from safetensors.torch import save_file

    kept = [item for item in plan if keeps_quantized(g, item)]
    bar.phase("re-laying the quantized weights", total=sum(item.nbytes_in_file for item in kept))
    save_file(block_tensors(quantize_plan(kept, dtype, bar.advance)), folder / BLOCKS_FILE)
    return [item for item in plan if not keeps_quantized(g, item)]


def write_folder(
    g: GGUFFile, config: dict, plan: list[TensorPlan], dtype: torch.dtype, folder: Path, bar: Progress
) -> None:
    """config.json, generation_config.json, tokenizer files and model.safetensors for `g`, in `folder`."""
    from transformers import AutoConfig, GenerationConfig

    hf_config = AutoConfig.for_model(**config, dtype=DTYPE_NAMES[dtype])  # validates, fills defaults
    hf_config.save_pretrained(folder)
    eos = generation_eos_ids(g)
    GenerationConfig(
        bos_token_id=config["bos_token_id"],
        eos_token_id=eos[0] if len(eos) == 1 else eos or None,
        pad_token_id=config["pad_token_id"],
    ).save_pretrained(folder)
    bar.phase("building the tokenizer")
    save_tokenizer(g, folder)
    bar.phase("dequantising the weights", total=sum(item.nbytes_in_file for item in plan))
    write_safetensors(folder / "model.safetensors", plan, dtype, bar.advance)


class Progress:
    """The conversion's progress on stderr (rich): a line per phase, and a bar over the GGUF's
    tensor bytes for the weights, the long part. Does nothing when disabled."""

    def __init__(self, title: str, enabled: bool) -> None:
        self.title, self.bar, self.task, self.total, self.done = title, None, None, 0, 0
        if enabled:
            from rich import progress as rp
            from rich.console import Console

            console = Console(stderr=True, highlight=False)
            self.bar = rp.Progress(
                rp.SpinnerColumn(finished_text="[green]done[/green]"),
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.TextColumn("{task.fields[size]}"),
                rp.TimeElapsedColumn(),
                console=console,
                transient=True,  # gone when done: a summary line on success, only the error on failure
                disable=not console.is_terminal,  # logs get the summary line alone
            )
        self.start = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
            if exc[0] is None:
                self.bar.console.print(f"converted {self.title} in {time.perf_counter() - self.start:.1f} s")

    def phase(self, name: str, total: int | None = None) -> None:
        """Close the current phase and start the next; with `total` (bytes) it gets a bar."""
        if self.bar is not None:
            self._finish()
            self.total, self.done = total or 0, 0
            self.task = self.bar.add_task(f"converting {self.title}: {name}", total=total, size="")

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.done += n
            self.bar.update(self.task, advance=n, size=f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB")

    def _finish(self) -> None:
        if self.task is not None:
            self.bar.update(self.task, total=self.total or 1, completed=self.total or 1)


def write_safetensors(path: Path, plan: list[TensorPlan], dtype: torch.dtype, advance=lambda n: None) -> None:
    """Stream `plan`'s tensors into one safetensors file, a chunk at a time.

    The format is a little-endian u64 header length, a JSON header of names, dtypes, shapes and
    byte ranges, then the bytes back to back; the header is known before any tensor is read, so
    memory holds one chunk, not the model.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in plan:
        nbytes = itemsize * math.prod(item.shape)
        header[item.name] = dict(
            dtype=SAFETENSORS_DTYPES[dtype], shape=list(item.shape), data_offsets=[offset, offset + nbytes]
        )
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for item in plan:
            written = 0
            for chunk, source_bytes in tensor_chunks(item, dtype):
                f.write(chunk.contiguous().view(torch.uint8).numpy())
                written += chunk.numel() * itemsize
                advance(source_bytes)
            if written != itemsize * math.prod(item.shape):
                raise ValueError(f"{item.name}: wrote {written} bytes, expected {itemsize * math.prod(item.shape)}")


def _record(folder: Path, g: GGUFFile, dtype: torch.dtype, final: Path, seconds: float) -> None:
    """kvgen_conversion.json: where this folder came from, for `kvgen info` and for people."""
    record = dict(
        source=str(g.path.resolve()),
        source_bytes=g.path.stat().st_size,
        architecture=g.architecture,
        tensor_types=g.type_counts(),
        dtype=DTYPE_NAMES[dtype],
        quantized_weights_kept=(folder / BLOCKS_FILE).is_file(),
        key=final.name,
        converter_version=CONVERTER_VERSION,
        seconds=round(seconds, 2),
    )
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def conversion_record(folder: Path) -> dict | None:
    """The kvgen_conversion.json of a converted folder, or None for any other folder."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
