"""Scoring through `kvgen serve` as evaluation harnesses do it, against transformers on the same weights.

The model is a tiny random Llama whose tokenizer adds a BOS token, as Llama's and Gemma's do:
a special token that is in the prompt's token ids but not in its text, which is what harnesses
that read `text_offset` trip over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
from test_server import running_server

from kvgen.testing import EOS, build_llama

# (context, continuations, index of the gold one): continuations start with a space, so the
# context's tokens are a prefix of the whole text's, and " naïve café" splits characters over tokens.
DOCS = [
    ("It was the best of times,", ["it was the worst of times", "call me Ishmael", "a truth universally"], 0),
    ("Call me", ["Ishmael.", "Alice.", "the season of Light."], 0),
    ("Alice was beginning to get very", ["tired", "wet", "naïve café"], 2),
    ("It is a truth universally", ["acknowledged", "known", "東京"], 1),
]
PAIRS = [(context, " " + choice) for context, choices, _ in DOCS for choice in choices]
TOLERANCE = 1e-4  # float32 on both sides


def add_bos(folder: Path) -> None:
    """Make the saved tokenizer put its BOS (here the EOS token, as GPT-2 has it) before every text."""
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    bos_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == EOS)
    bos = {"SpecialToken": {"id": EOS, "type_id": 0}}
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {EOS: {"id": EOS, "ids": [bos_id], "tokens": [EOS]}},
    }
    path.write_text(json.dumps(tokenizer))
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "add_bos_token": True}))


@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory) -> Path:
    folder = build_llama(tmp_path_factory.mktemp("llama-bos"))
    add_bos(folder)
    return folder


@pytest.fixture(scope="module")
def url(bos_llama, tmp_path_factory) -> Iterator[str]:
    with running_server(bos_llama, log=tmp_path_factory.mktemp("serve-bos") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def reference(bos_llama):
    """transformers' log-likelihood of a continuation after BOS + context, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bos_llama)
    model = AutoModelForCausalLM.from_pretrained(bos_llama, dtype=torch.float32).eval()

    def loglikelihood(context: str, continuation: str) -> float:
        whole = tokenizer(context + continuation).input_ids
        start = len(tokenizer(context).input_ids)
        assert whole[0] == tokenizer.bos_token_id and whole[:start] == tokenizer(context).input_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)  # (T, vocab)
        return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))

    return loglikelihood, tokenizer


def score(url: str, model: Path, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "echo": True,
            "logprobs": 1, **extra}  # fmt: skip
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_text_offset_indexes_the_returned_text(url, bos_llama, reference):
    """Each token's offset is where its text begins in `text`: the BOS adds none, and a token that
    ends inside a character counts with the token that completes it."""
    _, tokenizer = reference
    for context, continuation in PAIRS:
        choice = score(url, bos_llama, context + continuation, 0)["choices"][0]
        ids = tokenizer(context + continuation).input_ids
        assert choice["text"] == context + continuation
        assert choice["logprobs"]["tokens"][0] == EOS and choice["logprobs"]["text_offset"][0] == 0
        expected = [len(tokenizer.decode(ids[:i], skip_special_tokens=True).rstrip("\ufffd")) for i in range(len(ids))]
        assert choice["logprobs"]["text_offset"] == expected


def test_text_offset_scoring_equals_transformers(url, bos_llama, reference):
    """lm-evaluation-harness's text-offset scorer (its `gguf` model's, for llama.cpp-style servers)
    on kvgen's answers: the continuation is the tokens from the context's length in characters on."""
    from lm_eval.models.gguf import get_result

    loglikelihood, _ = reference
    for context, continuation in PAIRS:
        logprobs = score(url, bos_llama, context + continuation, 1)["choices"][0]["logprobs"]  # as it asks
        scored, _ = get_result(logprobs, len(context))
        assert scored == pytest.approx(loglikelihood(context, continuation), abs=TOLERANCE), (context, continuation)


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(url, bos_llama, reference):
    """OpenAI's scoring idiom: the prompt's logprobs and no generated token, streamed or not."""
    loglikelihood, _ = reference
    context, continuation = PAIRS[0]
    reply = score(url, bos_llama, context + continuation, 0)
    choice = reply["choices"][0]
    with_one = score(url, bos_llama, context + continuation, 1)["choices"][0]["logprobs"]
    assert choice["logprobs"] == {key: value[:-1] for key, value in with_one.items()}  # all but the generated token
    assert choice["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 0
    offsets, token_logprobs = choice["logprobs"]["text_offset"], choice["logprobs"]["token_logprobs"]
    scored = sum(lp for offset, lp in zip(offsets, token_logprobs) if offset >= len(context))
    assert scored == pytest.approx(loglikelihood(context, continuation), abs=TOLERANCE)
    body = {"model": str(bos_llama), "prompt": context, "max_tokens": 0, "echo": True, "logprobs": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and len(lines) == 2  # one chunk: the echoed prompt, finished
    chunk = json.loads(lines[0])["choices"][0]
    assert chunk["text"] == context and chunk["finish_reason"] == "length"
    error = httpx.post(f"{url}/v1/completions", json={**body, "echo": False, "stream": False}).json()["error"]
    assert error["param"] == "max_tokens" and "echo" in error["message"]


TASK = """\
task: kvgen_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_scores_like_transformers(url, bos_llama, reference, tmp_path):
    """The real lm-eval CLI's `local-completions` model on a multiple-choice task written here,
    through kvgen serve: each choice's log-likelihood and the accuracy equal transformers'.
    lm-eval tokenizes with the model's own tokenizer (a local path: nothing is downloaded) and
    sends token ids, BOS included (`add_bos_token`), so it counts the context's tokens as kvgen does."""
    loglikelihood, _ = reference
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "kvgen_tiny_mc.yaml").write_text(TASK.format(docs=docs))
    model_args = dict(base_url=f"{url}/v1/completions", model=bos_llama, tokenizer=bos_llama,
                      tokenizer_backend="huggingface", tokenized_requests=True, add_bos_token=True, max_retries=1)  # fmt: skip
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
         "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()), "--tasks", "kvgen_tiny_mc",
         "--include_path", str(tmp_path / "task"), "--log_samples", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **offline},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS)))
    correct = 0
    for sample in samples:
        context, choices, gold = DOCS[sample["doc_id"]]
        expected = [loglikelihood(context, " " + choice) for choice in choices]
        scored = [float(ll) for ll, _ in sample["filtered_resps"]]
        assert scored == pytest.approx(expected, abs=TOLERANCE), context
        assert sample["acc"] == float(expected.index(max(expected)) == gold)
        correct += expected.index(max(expected)) == gold
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["kvgen_tiny_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))
