"""Small random-weight checkpoints built with transformers' own classes, for tests and the demo.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few paragraphs of
public-domain text, and the weights are random, scaled up so that greedy decoding varies and the
top logits are well apart (at the default init a random model repeats one token, which would make
any comparison prove little).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TRAINING_TEXT = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light,
it was the season of Darkness, it was the spring of hope, it was the winter of despair.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,
and nothing particular to interest me on shore, I thought I would sail about a little and see the
watery part of the world. It is a way I have of driving off the spleen and regulating the circulation.
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in
want of a wife. However little known the feelings or views of such a man may be on his first entering
a neighbourhood, this truth is so well fixed in the minds of the surrounding families.
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to
do: once or twice she had peeped into the book her sister was reading, but it had no pictures or
conversations in it, "and what is the use of a book," thought Alice, "without pictures or conversations?"
Ünïcödé: naïve café, façade, smörgåsbord, 東京, Привет, 🙂 — multi-byte characters for streaming tests.
"""

EOS = "<|endoftext|>"


def train_tokenizer(folder: str | Path, vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([TRAINING_TEXT] * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    wrapped.save_pretrained(folder)
    return wrapped


def scale_weights(model: torch.nn.Module, factor: float, seed: int) -> None:
    """Redraw every matrix with a larger spread, so a random model's output is not one repeated token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * factor * p.shape[-1] ** -0.5)


def build_gpt2(folder: str | Path, seed: int = 0, scale: float = 1.0, **config: Any) -> Path:
    """Save a random GPT-2 (transformers' GPT2LMHeadModel) with a trained tokenizer to `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tokenizer = train_tokenizer(folder)
    defaults = dict(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4)
    cfg = GPT2Config(**{**defaults, **config}, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    scale_weights(model, scale, seed)
    model.save_pretrained(folder)
    return folder
