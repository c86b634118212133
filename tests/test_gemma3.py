"""Gemma 3 (text) against transformers on random checkpoints of several shapes.

The test prompts are 11, 17 and 31 tokens long and 48 tokens are generated, so every window below
is exceeded during decode, and most already during prefill.
"""

import dataclasses
import json
import shutil
from functools import cache

import pytest
import torch
from parity import PROMPTS, check_parity, hf_greedy, hf_model

import kvgen
from kvgen.cache import SPARE_SLOTS, make_cache
from kvgen.config import Gemma3Config
from kvgen.generate import decode_one, prefill
from kvgen.models.gemma3 import Gemma3
from kvgen.testing import build_gemma3

SLIDING, FULL = "sliding_attention", "full_attention"
SHAPES = {
    # One KV head (as Gemma 3 270M has) and a window shorter than every prompt.
    "mqa-window-6": dict(num_key_value_heads=1, sliding_window=6),
    # Real Gemma 3's pattern, five local layers per global one, with linear RoPE scaling on the global one.
    "five-local-per-global": dict(
        num_hidden_layers=6,
        layer_types=[SLIDING] * 5 + [FULL],
        sliding_window=8,
        num_key_value_heads=2,
        rope_parameters={
            SLIDING: dict(rope_type="default", rope_theta=10_000.0),
            FULL: dict(rope_type="linear", factor=8.0, rope_theta=1e6),
        },
    ),
    # Global layer first, biases, a head_dim unrelated to hidden_size / heads, a window only the longest
    # prompt exceeds, final logits soft-capped; attention soft-capping is set, but Gemma 3 never applies it.
    "global-first-bias-softcap": dict(
        seed=1,
        num_hidden_layers=3,
        layer_types=[FULL, SLIDING, SLIDING],
        attention_bias=True,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=12,
        query_pre_attn_scalar=20,
        sliding_window=16,
        final_logit_softcapping=15.0,
        attn_logit_softcapping=2.0,
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    @cache
    def build(shape: str):
        return build_gemma3(tmp_path_factory.mktemp(shape), **SHAPES[shape])

    return build


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(built, shape):
    check_parity(built(shape))


def test_window_off_by_one(built):
    """A query at p sees exactly p - window < q <= p: one slot more or less changes the logits."""
    folder = built("mqa-window-6")
    lm = kvgen.load(folder, dtype="float32")
    ids = lm.encode(PROMPTS[2])
    ids = torch.tensor([ids + hf_greedy(folder, ids, 16)])  # (1, 47): far past the window of 6
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = hf_model(str(folder))(ids).logits
        assert (lm.model(ids, positions, all_logits=True) - expected).abs().max() < 1e-4
        for window in (5, 7):
            other = Gemma3(dataclasses.replace(lm.model.config, sliding_window=window))
            other.load_state_dict(lm.model.state_dict())
            diff = (other(ids, positions, all_logits=True) - expected).abs().max()
            assert diff > 1e-2, f"a window of {window} instead of 6 changed the logits by only {diff:.1e}"


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_sliding_caches_stay_bounded(built, kind):
    """Sliding layers hold about `window` tokens however long the stream; global layers hold all of it."""
    lm = kvgen.load(built("five-local-per-global"), dtype="float32")
    model, window = lm.model, lm.model.config.sliding_window
    prompts = [lm.encode(p) for p in PROMPTS]
    tokens = torch.tensor([ids[:11] for ids in prompts])  # (3, 11): longer than the window
    n = 30
    cache = make_cache(kind, model.cache_layout(), 3, 11 + n, torch.float32)
    token = prefill(model, tokens, torch.arange(11).expand(3, -1), cache).argmax(-1)
    for i in range(n):
        token = decode_one(model, token, torch.full((3,), 11 + i), cache).argmax(-1)
    per_token = 3 * model.config.num_key_value_heads * model.config.head_dim * 4  # bytes of keys per token
    for layer_cache, kind_of_layer in zip(cache, model.config.layer_types):
        stored = layer_cache.keys.untyped_storage().nbytes() // per_token  # slots allocated
        held = layer_cache.length
        if kind_of_layer == SLIDING:
            assert held == (window - 1 if kind == "dynamic" else window)
            assert stored == window or (kind == "dynamic" and stored <= 2 * window + SPARE_SLOTS)
            assert layer_cache.positions.min() >= 11 + n - window  # only positions a later query could see
        else:
            assert held == 11 + n and (stored == 11 + n or kind == "dynamic" and stored <= 2 * (11 + n) + SPARE_SLOTS)


def test_old_config_format():
    """Hub checkpoints written before transformers 5 give rope_theta, rope_local_base_freq, rope_scaling
    and a sliding_window_pattern instead of rope_parameters and layer_types: both read alike."""
    from transformers import Gemma3TextConfig

    old = dict(
        model_type="gemma3_text",
        num_hidden_layers=8,
        sliding_window=512,
        sliding_window_pattern=4,
        rope_theta=1e6,
        rope_local_base_freq=10_000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0),
        attn_logit_softcapping=None,
    )
    ours, theirs = Gemma3Config.from_dict(old), Gemma3TextConfig(**old)
    assert list(ours.layer_types) == theirs.layer_types == ([SLIDING] * 3 + [FULL]) * 2
    new = json.loads(theirs.to_json_string())
    assert Gemma3Config.from_dict(new) == ours
    assert ours.rope_parameters[FULL] == dict(rope_type="linear", factor=8.0, rope_theta=1e6)
    assert ours.rope_parameters[SLIDING] == dict(rope_type="default", rope_theta=10_000.0)


def test_multimodal_checkpoint(built, tmp_path):
    """A `gemma3` checkpoint (Gemma3ForConditionalGeneration) runs its text model natively."""
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = built("mqa-window-6")
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    ref = hf_model(str(text))
    config = HFGemma3Config(text_config=ref.config, vision_config=vision, mm_tokens_per_image=4)
    multimodal = Gemma3ForConditionalGeneration(config).eval()
    multimodal.model.language_model.load_state_dict(ref.model.state_dict())
    multimodal.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(text / name, tmp_path / name)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"

    lm = kvgen.load(tmp_path, dtype="float32")
    ids = torch.tensor([lm.encode(PROMPTS[0])])
    with torch.no_grad():
        expected = multimodal(input_ids=ids).logits
        got = lm.model(ids, torch.arange(ids.shape[1])[None], all_logits=True)
    assert (got - expected).abs().max() < 1e-4
    same = kvgen.load(text, dtype="float32").generate(PROMPTS[0], 24, stop_at_eos=False)
    assert lm.generate(PROMPTS[0], 24, stop_at_eos=False).token_ids == same.token_ids


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_hf_backend_agrees(built, cache_kind):
    """`backend="hf"` runs transformers' generate() on the same folder, with its own sliding caches."""
    folder = built("mqa-window-6")
    native = kvgen.load(folder, dtype="float32").generate(PROMPTS[0], 48, stop_at_eos=False, cache=cache_kind)
    hf = kvgen.load(folder, dtype="float32", backend="hf").generate(PROMPTS[0], 48, stop_at_eos=False, cache=cache_kind)
    assert hf.token_ids == native.token_ids and len(set(native.token_ids)) > 8


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_chat_session_with_sliding_caches(built, cache_kind):
    """A chat keeps its cache between turns; where a window has dropped what the next turn needs,
    it starts afresh. Either way each turn equals a fresh run over the whole conversation."""
    from kvgen.chat import render

    lm = kvgen.load(built("mqa-window-6"), dtype="float32")
    session = lm.chat_session(cache=cache_kind)
    for user in ("It was the best of times", "Call me Ishmael."):
        reply = [r.token_id for r in session.send(user, 12, stop_at_eos=False)]
        fresh = lm.generate(render(lm, session.messages[:-1], session.template), 12, stop_at_eos=False)
        assert reply == fresh.token_ids
