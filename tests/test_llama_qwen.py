"""Llama, Qwen2 and Qwen3 against transformers on random checkpoints of several shapes.

The builders also randomise biases and norm scales (transformers initialises them to 0 and 1), so
each shape checks that every bias, norm and q/k norm it has is applied.
"""

import pytest
import torch
from parity import check_parity

import kvgen
from kvgen.testing import build_llama, build_qwen2, build_qwen3

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,  # small, so the tiny head's wavelengths fall in all three bands
)

# Seeds are picked so that check_parity's meaningfulness checks pass with margin: output varies, and
# the top-2 logits stay at least 4e-3 apart at every step (the builders' default scales keep
# float32 rounding in cached decode near 3e-5, well inside parity's 1e-4).
SHAPES = {
    "llama-gqa-untied": (build_llama, dict(seed=2, num_attention_heads=4, num_key_value_heads=2)),
    "llama-tied-linear-rope": (
        build_llama,
        dict(
            seed=3,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
        ),
    ),
    "llama-llama3-rope-bias-mqa": (
        build_llama,
        dict(
            seed=0,
            num_hidden_layers=3,
            num_key_value_heads=1,
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "qwen2-gqa-tied": (build_qwen2, dict(seed=3, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-sliding-window": (  # layers 1 and 2 see the last 12 tokens only
        build_qwen2,
        dict(seed=2, num_hidden_layers=3, use_sliding_window=True, sliding_window=12, max_window_layers=1),
    ),
    "qwen3-gqa-head-dim-untied": (build_qwen3, dict(seed=3, num_key_value_heads=2, head_dim=24)),
    "qwen3-attention-bias-tied": (
        build_qwen3,
        dict(seed=2, num_key_value_heads=1, head_dim=8, attention_bias=True, tie_word_embeddings=True),
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_parity(tmp_path, shape):
    build, config = SHAPES[shape]
    check_parity(build(tmp_path, **config))


def test_config_reads_old_rope_keys():
    """config.json from transformers 4 (top-level rope_theta, rope_scaling with "type") loads alike."""
    from kvgen.config import LlamaConfig

    old = dict(
        model_type="llama",
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_theta=5e5,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    )
    config = LlamaConfig.from_dict(old)
    assert config.rope_parameters == dict(
        rope_type="llama3",
        type="llama3",
        rope_theta=5e5,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    assert (config.num_key_value_heads, config.head_dim) == (4, 16)


def test_tied_head_shares_the_embedding(tmp_path):
    """A tied checkpoint stores the embedding once, and the loaded head reads the same memory."""
    from safetensors import safe_open

    folder = build_qwen2(tmp_path, tie_word_embeddings=True)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = kvgen.load(folder, dtype="float32").model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_all_logits_end_with_the_last_position(tmp_path):
    model = kvgen.load(build_qwen3(tmp_path, head_dim=24), dtype="float32").model
    tokens = torch.randint(0, model.config.vocab_size, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        last, every = model(tokens, positions), model(tokens, positions, all_logits=True)
    assert every.shape == (2, 7, model.config.vocab_size)
    torch.testing.assert_close(every[:, -1], last)
