"""GPT-2 against transformers on random checkpoints of several shapes."""

import pytest
from parity import check_parity

from kvgen.testing import build_gpt2

SHAPES = {
    "deep-narrow": dict(n_layer=6, n_embd=32, n_head=2),
    "inverse-layer-idx-n-inner": dict(
        seed=1, n_layer=3, n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True, n_inner=96
    ),
    "gelu-exact": dict(n_layer=2, n_embd=48, n_head=3, activation_function="gelu"),
    "upcast-relu-unscaled": dict(
        seed=1, scale=2.0, reorder_and_upcast_attn=True, activation_function="relu", scale_attn_weights=False
    ),
}


def test_tiny(gpt2_tiny):
    check_parity(gpt2_tiny)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(tmp_path, shape):
    check_parity(build_gpt2(tmp_path, **SHAPES[shape]))


GPT2_124M = dict(seed=1, scale=3.0, n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


@pytest.mark.slow
def test_124m_shape(tmp_path):
    check_parity(build_gpt2(tmp_path, **GPT2_124M))
