"""The screened LM head (`kvgen.screen`): its int8 logits stay within their bound of the exact
product, and the token it lets a greedy step choose is the full product's, ties included. The
reference is the plain head (`F.linear` on the same weight) and the `fast=False` model."""

import pytest
import torch
import torch.nn.functional as F

import kvgen
import kvgen.screen
from kvgen.fast import speed_up
from kvgen.generate import generate_tokens
from kvgen.sampling import SamplingParams
from kvgen.screen import Rotation, ScreenedHead, argmax_only
from kvgen.testing import build_gemma3, build_gpt2, build_llama, build_qwen2

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm's int8 product is x86-only"
)
BUILDERS = {
    "gpt2": (build_gpt2, {}),
    "llama-gqa": (build_llama, dict(num_key_value_heads=2)),
    "qwen2-tied": (build_qwen2, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gemma3-sliding": (build_gemma3, dict(num_key_value_heads=1, sliding_window=6)),
}
PROMPTS = ["the cat sat on the mat", "It was the best of times", "a"]  # batched: left padding
VOCAB, WIDTH = 5000, 96  # 96 = 32 x 3: a Hadamard block of 32 and a 3-wide random rotation


def activations(n: int, seed: int) -> torch.Tensor:
    """Final hidden states as a real model has them: a few channels ten times the rest."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, WIDTH, generator=generator)
    x[:, :4] *= 10
    return x


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def head(request):
    torch.manual_seed(0)
    linear = torch.nn.Linear(WIDTH, VOCAB, bias=False).to(getattr(torch, request.param)).requires_grad_(False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.3)
        linear.weight[4000] = linear.weight[17]  # an exact tie: the first index must win, as in argmax
        linear.weight[4001] = linear.weight[18] * (1 + torch.finfo(linear.weight.dtype).eps)  # a near one
    return ScreenedHead(linear)


def test_rotation_is_orthogonal():
    rotation = Rotation(WIDTH)
    x, y = torch.randn(2, 7, WIDTH, dtype=torch.float64).float()
    torch.testing.assert_close((rotation(x) * rotation(y)).sum(-1), (x * y).sum(-1), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(rotation(x), x)


def test_int8_logits_are_within_their_bound(head):
    x = activations(64, seed=1).to(head.weight.dtype)
    a, x_norm, x_error = head.approximate(x)
    exact = x.double() @ head.weight.double().t()
    every = torch.arange(VOCAB).expand(len(x), -1)
    bound = head.bound(a, x_norm[:, None], x_error[:, None], every)
    assert ((a.double() - exact).abs() <= bound).all()
    assert (a.double() - exact).abs().max() > 1e-3  # the int8 product is not exact: the bound does work


def test_greedy_choice_is_the_full_products(head):
    x = activations(200, seed=2).to(head.weight.dtype)
    x[:4] = head.weight[[17, 18, 17, 18]]  # points at the tied rows: their logits are the largest
    full = F.linear(x, head.weight)
    screened = head.screened_logits(x)
    assert torch.equal(screened.argmax(-1), full.argmax(-1))
    # 17 ties 4000 exactly: the first index wins; 4001 is 18 scaled up by one step of the dtype
    assert screened[:4].argmax(-1).tolist() == [17, 4001, 17, 4001] == full[:4].argmax(-1).tolist()
    kept = screened.isfinite()
    torch.testing.assert_close(screened[kept], full[kept], rtol=1e-6, atol=1e-5)  # the plain head's logits
    assert kept.sum(-1).float().mean() < VOCAB / 50  # and few are kept: the screen does screen
    assert head.screened and not head.fallbacks


def test_flat_logits_fall_back_to_the_full_product(head):
    x = torch.zeros(2, WIDTH, dtype=head.weight.dtype)
    x[1, 0] = 1e-30  # every logit about equal: every token could win
    before = head.fallbacks
    assert torch.equal(head.screened_logits(x), F.linear(x, head.weight))
    assert head.fallbacks == before + 1


def test_only_argmax_readers_get_screened_logits(head):
    x = activations(3, seed=3).to(head.weight.dtype)
    model = torch.nn.Module()
    model.lm_head = head
    assert torch.equal(head(x), F.linear(x, head.weight))
    with argmax_only(model):
        assert not head(x).isfinite().all()
    with argmax_only(model, on=False):
        assert head(x).isfinite().all()
    assert head(x).isfinite().all()


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory):
    build, config = BUILDERS[request.param]
    return build(tmp_path_factory.mktemp(request.param), **config)


def greedy(lm, cache: str, **kwargs) -> list[list[int]]:
    prompts = [lm.encode(p) for p in PROMPTS]
    return torch.stack(list(generate_tokens(lm.model, prompts, 24, cache_kind=cache, **kwargs)), 1).tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_greedy_tokens_as_the_reference_path(folder, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    reference = kvgen.load(folder, dtype=dtype, fast=False)
    screened = kvgen.load(folder, dtype=dtype, screen_head=True)
    head = screened.model.lm_head
    assert isinstance(head, ScreenedHead)
    for cache in ("dynamic", "static"):
        want = greedy(reference, cache)
        assert greedy(screened, cache) == want, cache
        assert len({tuple(row) for row in want}) > 1 and all(len(set(row)) > 2 for row in want)  # not degenerate
    assert head.screened > head.fallbacks  # most steps were screened
    text = "the cat sat on the mat and the cat sat on the mat and the cat"
    plain = reference.generate(text, 16, stop_at_eos=False).token_ids
    assert screened.generate(text, 16, stop_at_eos=False, speculative="prompt_lookup").token_ids == plain


def test_sampling_reads_every_logit(folder, tmp_path, monkeypatch):
    """A sampled step gets the full product, so a seed draws what it draws without the screen."""
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    plain = kvgen.load(folder, dtype="float32")
    screened = kvgen.load(folder, dtype="float32", screen_head=True)
    prompts = [plain.encode(p) for p in PROMPTS]
    want = torch.stack(list(generate_tokens(plain.model, prompts, 16, params)), 1)
    assert torch.equal(torch.stack(list(generate_tokens(screened.model, prompts, 16, params)), 1), want)
    assert screened.model.lm_head.screened == 0


def test_state_dict_unchanged(folder):
    model = kvgen.load(folder, dtype="float32", fast=False).model
    before = model.state_dict()
    speed_up(model, pack_weights=True, screen_head=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_int8_copy_is_stored_once_and_read_back(gpt2_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    first = kvgen.load(gpt2_tiny, screen_head=True)
    (stored,) = (tmp_path / "screened-heads").glob("*.safetensors")
    want = greedy(first, "dynamic")
    monkeypatch.setattr(ScreenedHead, "quantize_rows", lambda self: pytest.fail("computed again"))
    again = kvgen.load(gpt2_tiny, screen_head=True)
    assert greedy(again, "dynamic") == want
    torch.testing.assert_close(again.model.lm_head.error_norms, first.model.lm_head.error_norms, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    stored.write_bytes(stored.read_bytes()[:1000])  # a damaged copy is computed again, and replaced
    assert greedy(kvgen.load(gpt2_tiny, screen_head=True), "dynamic") == want
    assert stored.stat().st_size > 1000 and not list(tmp_path.rglob("*.tmp"))


def test_compiled_step_keeps_the_screen(gpt2_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    lm = kvgen.load(gpt2_tiny, screen_head=True)
    want = greedy(kvgen.load(gpt2_tiny, fast=False), "static")
    before = lm.model.lm_head.screened
    assert greedy(lm, "static", compile_step=True) == want
    assert lm.model.lm_head.screened > before  # the compiled step called the screen, through its op
    monkeypatch.setattr(kvgen.screen, "MAX_CANDIDATE_SHARE", 0)
    assert greedy(lm, "static", compile_step=True) == want  # and its fallback
    monkeypatch.undo()
    # One row: the compiled step drops the packed copies (kvgen.fast.unpack), the screen stays, and
    # a sampled run's every logit comes from the plain weight inside the compiled step.
    sampled = lm.generate(PROMPTS[0], 16, temperature=0.8, seed=3, cache="static")
    alone = lm.generate(PROMPTS[0], 16, cache="static")
    before = lm.model.lm_head.screened
    assert lm.generate(PROMPTS[0], 16, cache="static", compile_step=True).token_ids == alone.token_ids
    assert lm.model.lm_head.screened > before and lm.model.lm_head.full() is None
    options = dict(temperature=0.8, seed=3, cache="static", compile_step=True)
    assert lm.generate(PROMPTS[0], 16, **options).token_ids == sampled.token_ids
