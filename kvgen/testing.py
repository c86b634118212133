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
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
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


def build_gpt2(folder: str | Path, seed: int = 0, scale: float = 4.0, **config: Any) -> Path:
    """Save a random GPT-2 (transformers' GPT2LMHeadModel) with a trained tokenizer to `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tokenizer = train_tokenizer(folder)
    defaults = dict(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4)
    cfg = GPT2Config(**{**defaults, **config}, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    scale_weights(model, scale, seed)
    randomize_vectors(model, seed, bias_spread=0.1)  # ln_f's bias alone would pick the same token each step
    model.save_pretrained(folder)
    return folder


def build_gemma3(folder: str | Path, seed: int = 0, scale: float = 2.0, **config: Any) -> Path:
    """Save a random Gemma 3 text model (transformers' Gemma3ForCausalLM) with a trained tokenizer to `folder`.

    Gemma's RMSNorm weights are offsets from 1 and start at 0, so they are redrawn too: the tests
    then see every norm. The q/k norms get a wide spread, or attention stays near-uniform; the
    post-attention and post-MLP norms are lifted by 3, or each block's output is drowned by the
    embedding (scaled by sqrt(hidden_size)) and the tied head keeps repeating the last token.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = Path(folder)
    tokenizer = train_tokenizer(folder)
    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=256,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    eos = tokenizer.eos_token_id
    cfg = Gemma3TextConfig(**{**defaults, **config}, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    scale_weights(model, scale, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.randn(p.shape, generator=generator) * 2.0)
            elif name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif name.endswith(".bias"):  # attention_bias=True: start at zero otherwise
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p += 3.0
    model.save_pretrained(folder)
    return folder


def randomize_vectors(model: torch.nn.Module, seed: int, bias_spread: float = 0.5, norm_spread: float = 0.2) -> None:
    """Redraw biases around 0 and norm scales around 1: transformers initialises them to exactly 0
    and 1, and a test could not then tell whether they are applied at all."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=generator)
                p.copy_(noise * bias_spread if name.endswith(".bias") else 1 + noise * norm_spread)


def _build_decoder(
    folder: str | Path, config_class: type, model_class: type, seed: int, scale: float, config: dict
) -> Path:
    """A random Llama-layout decoder (transformers' classes) with a trained tokenizer, saved to `folder`.

    Keep `scale` small (about 2) without q/k norms: attention logits grow as scale squared, and
    past about 3 float32 rounding alone moves cached-decode logits by more than parity's 1e-4.
    """
    folder = Path(folder)
    tokenizer = train_tokenizer(folder)
    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    cfg = config_class(
        **{**defaults, **config}, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    model = model_class(cfg)
    scale_weights(model, scale, seed)
    randomize_vectors(model, seed)
    model.save_pretrained(folder)
    return folder


def build_llama(folder: str | Path, seed: int = 0, scale: float = 2.0, **config: Any) -> Path:
    """Save a random Llama (transformers' LlamaForCausalLM) with a trained tokenizer to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build_decoder(folder, LlamaConfig, LlamaForCausalLM, seed, scale, config)


def build_qwen2(folder: str | Path, seed: int = 0, scale: float = 2.0, **config: Any) -> Path:
    """Save a random Qwen2 (transformers' Qwen2ForCausalLM) with a trained tokenizer to `folder`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build_decoder(folder, Qwen2Config, Qwen2ForCausalLM, seed, scale, config)


def build_qwen3(folder: str | Path, seed: int = 0, scale: float = 4.0, **config: Any) -> Path:
    """Save a random Qwen3 (transformers' Qwen3ForCausalLM) with a trained tokenizer to `folder`.

    The default scale is twice Llama's: the q/k norms keep attention logits bounded, so larger
    weights spread the output logits without making float32 results ill-conditioned.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build_decoder(folder, Qwen3Config, Qwen3ForCausalLM, seed, scale, config)
