"""The sampler's pure functions against transformers' logits processors, and its laws."""

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvgen.sampling import SamplingParams, min_p, repetition_penalty, sample, top_k, top_p


@pytest.fixture
def logits():
    return torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3


def test_filters_match_transformers(logits):
    ids = torch.zeros(4, 1, dtype=torch.long)
    for k in (1, 5, 50):
        assert torch.equal(top_k(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.05, 0.5, 0.9):
        assert torch.equal(top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))
    for p in (0.01, 0.2, 0.9):
        assert torch.equal(min_p(logits, p), MinPLogitsWarper(p)(ids, logits.clone()))
    history = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(repetition_penalty(logits, history, 1.3), expected)
    assert torch.allclose(logits / 0.7, TemperatureLogitsWarper(0.7)(ids, logits.clone()))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = top_p(probs.log(), 0.8).isfinite()
    assert kept.tolist() == [[False, True, False, True]]


def test_greedy_is_argmax_and_limits_equal_greedy(logits):
    greedy = sample(logits, SamplingParams())
    assert torch.equal(greedy, logits.argmax(-1))
    for params in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-9),
        SamplingParams(temperature=2.0, min_p=1.0),
    ):
        assert torch.equal(sample(logits, params, params.generator()), greedy)


def test_values_near_zero_sample_their_limit_not_nan(logits):
    """A temperature or repetition penalty so near 0 that dividing by it overflows float32 (the
    smallest positive double, as a fuzzer sends) samples what the values tend to."""
    for temperature in (1e-6, 1e-40, 5e-324):
        params = SamplingParams(temperature=temperature, seed=0)
        assert torch.equal(sample(logits, params, params.generator()), logits.argmax(-1))
    second = logits.topk(2, dim=-1).indices[:, 1:]  # (B, 1): each row's second most likely token
    assert (logits.gather(-1, second) > 0).all()  # so a penalty below 1 raises it above the first
    for penalty in (1e-40, 5e-324):
        params = SamplingParams(temperature=0.5, repetition_penalty=penalty, seed=0)
        assert torch.equal(sample(logits, params, params.generator(), second), second[:, 0])


def test_same_seed_same_draws(logits):
    def draws(params):
        generator = params.generator()
        return [sample(logits, params, generator).tolist() for _ in range(5)]

    seven = SamplingParams(temperature=1.0, seed=7)
    assert draws(seven) == draws(seven)
    assert draws(seven) != draws(SamplingParams(temperature=1.0, seed=8))


def test_samples_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, seed=0)
    generator = params.generator()
    draws = torch.stack([sample(logits.expand(1000, 4), params, generator) for _ in range(10)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.01)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2.0),
        dict(repetition_penalty=0),
    ],
)
def test_bad_parameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
