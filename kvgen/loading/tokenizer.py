"""A model's tokenizer, loaded without transformers where transformers would add nothing.

transformers' fast tokenizers run the `tokenizers` library underneath. For a `tokenizer.json`
that transformers loads as it is (its generic classes, `TokenizersBackend` and
`PreTrainedTokenizerFast`), encoding and decoding through `tokenizers` directly give the same ids
and text, and skip importing transformers: 0.9 s of a 3 s load of the default model. A chat template is
rendered by transformers' own Jinja renderer (imported on first use, 0.6 s) and encoded here.
Only what kvgen does not mirror (setting a template, tools, documents) loads transformers'
tokenizer, which from then on replaces the raw one, so there is only ever one in memory.

Other tokenizers (model-specific classes, which may rebuild the pipeline in Python; a
`tokenizer.json` whose BOS/EOS handling disagrees with `tokenizer_config.json`; no
`tokenizer.json` at all) load through `AutoTokenizer` from the start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tokenizer_config.json classes that transformers builds from tokenizer.json unchanged.
GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# The named special tokens transformers hands a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """The part of transformers' tokenizer API that kvgen uses: `encode`, `decode`, `len`, the
    special token ids, `chat_template` and `apply_chat_template`. Build one with `load_tokenizer`."""

    def __init__(self, folder: Path, backend: Any = None, config: dict | None = None) -> None:
        self.folder = folder
        self.backend = backend  # a tokenizers.Tokenizer, until transformers' tokenizer replaces it
        self.config = config or {}
        self.transformers: Any = None
        if backend is None:
            self.load_transformers()

    def load_transformers(self) -> Any:
        """Load transformers' tokenizer now and use it for everything from then on."""
        if self.transformers is None:
            from transformers import AutoTokenizer

            self.transformers = AutoTokenizer.from_pretrained(self.folder)
            self.backend = None  # one tokenizer in memory: the raw one goes
        return self.transformers

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the model adds (BOS, for most)."""
        if self.transformers is not None:
            return self.transformers.encode(text)
        return self.backend.encode(text).ids

    def decode(
        self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        if self.transformers is not None or clean_up_tokenization_spaces:
            return self.load_transformers().decode(
                ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up_tokenization_spaces
            )
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        """Tokens in the vocabulary, added ones included."""
        if self.transformers is not None:
            return len(self.transformers)
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        if self.transformers is not None:
            return getattr(self.transformers, f"{name}_id")
        token = self.config.get(name)
        token = token.get("content") if isinstance(token, dict) else token  # a serialised AddedToken
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template, where it has one (settable, as on transformers' tokenizers)."""
        if self.transformers is not None:
            return self.transformers.chat_template
        jinja = self.folder / "chat_template.jinja"  # where transformers 5 saves it
        return jinja.read_text() if jinja.is_file() else self.config.get("chat_template")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self.load_transformers().chat_template = template

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens, as chat templates see them (`bos_token`, `eos_token`, ...)."""
        if self.transformers is not None:
            return self.transformers.special_tokens_map
        named = {name: self.config.get(name) for name in SPECIAL_TOKENS}
        return {name: t.get("content") if isinstance(t, dict) else t for name, t in named.items() if t is not None}

    def apply_chat_template(
        self, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = False, **kwargs: Any
    ) -> dict[str, list[int]]:
        """transformers' `apply_chat_template` for one conversation -> {"input_ids", "attention_mask"}.

        Rendered by transformers' own Jinja renderer with the named special tokens, then encoded
        without adding special tokens, which is what transformers does; other options (tools,
        documents, ...) go to transformers' tokenizer itself.
        """
        template = chat_template or self.chat_template
        if self.transformers is not None or kwargs or not template:
            return self.load_transformers().apply_chat_template(
                messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, **kwargs
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        (text,), _ = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a model folder: through `tokenizers` alone where that gives transformers'
    ids (see the module's docstring), else through transformers."""
    folder = Path(folder)
    path, config_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not path.is_file() or config.get("tokenizer_class") not in GENERIC_CLASSES:
        return Tokenizer(folder)
    import tokenizers

    tokenizer = Tokenizer(folder, tokenizers.Tokenizer.from_file(str(path)), config)
    if not _adds_what_config_says(tokenizer):
        return Tokenizer(folder)
    return tokenizer


def _adds_what_config_says(tokenizer: Tokenizer) -> bool:
    """Whether tokenizer.json adds BOS and EOS as tokenizer_config.json's add_bos_token and
    add_eos_token say (transformers follows the config where the two disagree)."""
    ids = tokenizer.backend.encode("a").ids
    for flag, token_id, end in (
        ("add_bos_token", tokenizer.bos_token_id, 0),
        ("add_eos_token", tokenizer.eos_token_id, -1),
    ):
        if flag in tokenizer.config and token_id is not None and tokenizer.config[flag] != (ids[end] == token_id):
            return False
    return True
