"""Model families, found by the `model_type` of a checkpoint's config."""

from __future__ import annotations

from types import ModuleType

from . import gemma3, gpt2, llama, qwen

FAMILIES: dict[str, tuple[type, ModuleType]] = {
    "gpt2": (gpt2.GPT2, gpt2),
    "gemma3_text": (gemma3.Gemma3, gemma3),
    "gemma3": (gemma3.Gemma3, gemma3),  # multimodal checkpoints: the text model only
    "llama": (llama.Llama, llama),
    "qwen2": (qwen.Qwen2, qwen),
    "qwen3": (qwen.Qwen3, qwen),
}


def family(model_type: str) -> tuple[type, ModuleType]:
    """`model_type` -> (model class, its module with `remap`)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; kvgen supports: {', '.join(sorted(FAMILIES))}"
        ) from None
