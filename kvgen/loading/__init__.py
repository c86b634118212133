"""Finding a model on disk and loading its weights without copying them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..models import family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    try:
        return DTYPES[aliases.get(dtype, dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}") from None


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder, or a hub id already in the local Hugging Face cache (never downloaded)."""
    path = Path(name_or_path).expanduser()
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


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {e}") from None


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, memory-mapped: nothing is read until it is used."""
    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})
    if not files and (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", mmap=True, weights_only=True, map_location="cpu")
    if not state:
        raise ValueError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    return state


def load_native(folder: Path, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Build the model on the meta device, then adopt the checkpoint's tensors as its parameters."""
    raw = read_config(folder)
    model_cls, module = family(raw.get("model_type", "?"))
    with torch.device("meta"):
        model = model_cls(model_cls.config_class.from_dict(raw))
    converted: dict[int, Tensor] = {}  # by identity, so a tied tensor is converted once

    def convert(t: Tensor) -> Tensor:
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return converted[id(t)]

    state = {name: convert(t) for name, t in module.remap(read_weights(folder)).items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
