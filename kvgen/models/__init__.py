"""Model families, found by the `model_type` of a checkpoint's config."""

from __future__ import annotations

from types import ModuleType

from . import gpt2

FAMILIES: dict[str, tuple[type, ModuleType]] = {
    "gpt2": (gpt2.GPT2, gpt2),
}


def family(model_type: str) -> tuple[type, ModuleType]:
    """`model_type` -> (model class, its module with `remap`)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; kvgen supports: {', '.join(sorted(FAMILIES))}"
        ) from None
