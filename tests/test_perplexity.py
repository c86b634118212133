"""Perplexity streamed token by token: dense and recompute against transformers on the same weights,
the windowed policies equal to dense while the text fits, apart once it does not; the CLI's table,
JSON and plot, and its refusals."""

import io
import json
import math

import pytest
import torch
from parity import hf_model

import kvgen
from kvgen.perplexity import long_text, moving_average, perplexity, running_log_perplexity, token_nlls
from kvgen.testing import TRAINING_TEXT, build_gemma3, build_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, LM): a 2-layer Llama with a 64-token context."""
    folder = build_llama(tmp_path_factory.mktemp("ppl-llama"), max_position_embeddings=64)
    return folder, kvgen.load(folder, dtype="float32")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(folder, LM): a Gemma 3 with a 16-token sliding layer and a global one, 64-token context."""
    folder = build_gemma3(tmp_path_factory.mktemp("ppl-gemma3"), max_position_embeddings=64)
    return folder, kvgen.load(folder, dtype="float32")


@pytest.fixture(scope="module")
def ids(llama):
    ids = llama[1].encode(TRAINING_TEXT)
    assert len(ids) > 200
    return ids


def hf_nll(model, ids):
    """NLL of each token after the first, from one transformers forward over all of `ids`."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (T, vocab)
    return -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dense_equals_one_transformers_forward(request, arch, ids):
    folder, lm = request.getfixturevalue(arch)
    text = ids[:64]  # the whole context
    run = perplexity(lm.model, text, "dense")
    expected = hf_nll(hf_model(folder), text)
    assert run.tokens == 63
    torch.testing.assert_close(torch.tensor(run.nll, dtype=torch.float64), expected, rtol=0, atol=1e-4)
    assert math.isclose(run.perplexity, math.exp(expected.mean().item()), rel_tol=1e-4)
    assert run.perplexity == math.exp(math.fsum(run.nll) / len(run.nll))


def test_recompute_equals_transformers_over_each_window(llama, ids):
    folder, lm = llama
    text, window = ids[:50], 12
    run = perplexity(lm.model, text, "recompute", window=window)
    model = hf_model(folder)
    expected = []
    for i in range(len(text) - 1):
        kept = text[max(i + 1 - window, 0) : i + 1]
        with torch.no_grad():
            logits = model(torch.tensor([kept]), position_ids=torch.arange(len(kept))[None]).logits[0, -1].double()
        expected.append(-torch.log_softmax(logits, dim=-1)[text[i + 1]].item())
    torch.testing.assert_close(run.nll, expected, rtol=0, atol=1e-4)
    assert run.window == window and run.sinks == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_all_policies_equal_dense_while_the_text_fits(request, arch, ids):
    _, lm = request.getfixturevalue(arch)
    text = ids[:40]  # within the window (40) and so within sinks + window; past Gemma's 16-token sliding window
    dense = perplexity(lm.model, text, "dense").nll
    # The same loop on another cache: the same numbers. Gemma's sliding layers then keep a ring, not a
    # windowed dynamic cache, so there float rounding differs.
    atol = 1e-9 if arch == "llama" else 1e-4
    for policy in ("window", "sink"):
        torch.testing.assert_close(perplexity(lm.model, text, policy, window=40, sinks=4).nll, dense, rtol=0, atol=atol)
    torch.testing.assert_close(perplexity(lm.model, text, "recompute", window=40).nll, dense, rtol=0, atol=1e-4)


def test_window_and_sink_part_past_the_window(llama, ids):
    _, lm = llama
    text, window, sinks = ids[:240], 16, 4  # almost four times the 64-token context
    runs = {policy: perplexity(lm.model, text, policy, window=window, sinks=sinks) for policy in ("window", "sink")}
    first_apart = window  # token `window` is the first scored after the window policy drops one
    head = {p: r.nll[:first_apart] for p, r in runs.items()}
    torch.testing.assert_close(head["window"], head["sink"], rtol=0, atol=1e-9)  # both still hold everything
    tail = {p: torch.tensor(r.nll[first_apart + sinks :]) for p, r in runs.items()}
    assert (tail["window"] - tail["sink"]).abs().min() > 0  # every later token is scored differently
    for run in runs.values():
        assert run.tokens == 239 and all(math.isfinite(v) for v in run.nll) and math.isfinite(run.perplexity)
    layer = 2 * 2 * 16 * 4  # keys and values: 2 kv heads x 16 dims x float32, per token
    assert runs["window"].cache_bytes == 2 * window * layer and runs["sink"].cache_bytes == 2 * (sinks + window) * layer
    with pytest.raises(ValueError, match="dense cache needs the text within the model's context"):
        perplexity(lm.model, text, "dense")


def test_generator_and_helpers(llama, ids):
    _, lm = llama
    scored, nlls, _ = zip(*token_nlls(lm.model, ids[:20], "sink", window=8, sinks=2))
    run = perplexity(lm.model, ids[:20], "sink", window=8, sinks=2)
    assert list(nlls) == run.nll and list(scored) == run.scored == list(range(1, 20))
    assert running_log_perplexity([1.0, 3.0, 2.0]) == [1.0, 2.0, 2.0]
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    for bad, match in (
        (dict(policy="full"), "unknown cache policy"),
        (dict(window=0), "window must be"),
        (dict(sinks=-1), "sink_tokens must be"),
        (dict(window=61), "exceeds the model's context"),
        (dict(policy="window", window=65), "exceeds the model's context"),
        (dict(ids=ids[:1]), "at least 2"),
        (dict(every=0), "every must be at least 1"),
        (dict(ids=ids[:5], every=5), "at least 6"),
    ):
        kwargs = dict(ids=ids[:30], policy="sink", window=None, sinks=4) | bad
        with pytest.raises(ValueError, match=match):
            perplexity(lm.model, kwargs.pop("ids"), kwargs.pop("policy"), **kwargs)


@pytest.mark.parametrize("policy", ["dense", "window", "sink", "recompute"])
def test_scoring_every_kth_token_samples_the_full_run(llama, ids, policy):
    _, lm = llama
    text, every = ids[:60], 7
    full = perplexity(lm.model, text, policy, window=16, sinks=4)
    sampled = perplexity(lm.model, text, policy, window=16, sinks=4, every=every)
    assert sampled.scored == list(range(every, 60, every)) and sampled.every == every
    expected = [full.nll[t - 1] for t in sampled.scored]  # full.nll[j] scores token j + 1
    torch.testing.assert_close(sampled.nll, expected, rtol=0, atol=1e-5)
    # Streaming policies still feed every token; recompute runs one forward per token scored.
    assert sampled.steps == (len(sampled.scored) if policy == "recompute" else sampled.scored[-1])
    assert full.steps == 59


def test_cli_table_json_and_plot(cli, tmp_path, llama):
    from matplotlib.image import imread

    folder, _ = llama
    text = tmp_path / "book.txt"
    text.write_text(TRAINING_TEXT, encoding="utf-8")
    out_json, out_png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    code, out, err = cli(
        "perplexity", text, "-m", folder, "--cache", "dense,window", "--cache", "sink", "--cache", "recompute",
        "--window", 20, "--sink-tokens", 2, "--max-tokens", 100, "-o", out_json, "--plot", out_png,
    )  # fmt: skip
    assert code == 0, err
    assert "scoring the first 64 of 100 tokens" in err  # dense caps every policy at the context
    for word in ("dense", "window", "sink", "recompute", "perplexity", "cache bytes"):
        assert word in out
    doc = json.loads(out_json.read_text())
    assert doc["tokens"] == 64 and [r["policy"] for r in doc["runs"]] == ["dense", "window", "sink", "recompute"]
    for run in doc["runs"]:
        assert run["tokens"] == len(run["nll"]) == 63
        assert math.isclose(run["perplexity"], math.exp(sum(run["nll"]) / 63), rel_tol=1e-12)
    assert [(r["window"], r["sinks"]) for r in doc["runs"]] == [(None, 0), (20, 0), (20, 2), (20, 0)]
    image = imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 500
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary files, renamed into place

    # Past the context without dense: the whole text, from standard input
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO(TRAINING_TEXT))
        code, out, err = cli(
            "perplexity", "-", "-m", folder, "--cache", "sink,recompute", "--max-tokens", 150, "--every", 10,
            "-o", out_json,
        )  # fmt: skip
    assert code == 0 and "150 tokens, every 10th" in out and "note" not in err
    doc = json.loads(out_json.read_text())
    assert doc["every"] == 10 and [r["scored"] for r in doc["runs"]] == [list(range(10, 150, 10))] * 2


def test_the_built_in_long_text(cli, tmp_path, llama):
    """Shakespeare, shipped offline by a package: long, plain (no Markdown marks), and the default FILE."""
    text = long_text()
    assert len(text) > 500_000 and "To be, or not to be" in text and "Out, damned spot" in text
    assert "**" not in text and "\n#" not in text and not any(line.endswith(" ") for line in text.splitlines())
    folder, _ = llama
    out_json = tmp_path / "ppl.json"
    code, _, err = cli("perplexity", "-m", folder, "--cache", "sink", "--max-tokens", 80, "-o", out_json)
    assert code == 0, err
    (run,) = json.loads(out_json.read_text())["runs"]
    assert run["tokens"] == 79 and math.isfinite(run["perplexity"])


def test_cli_refusals(cli, tmp_path, llama, gpt2_tiny):
    folder, _ = llama
    text, empty, short = tmp_path / "book.txt", tmp_path / "empty.txt", tmp_path / "short.txt"
    text.write_text(TRAINING_TEXT, encoding="utf-8")
    empty.write_text("  \n", encoding="utf-8")
    short.write_text("I", encoding="utf-8")
    cases = [
        (tmp_path / "missing.txt", "-m", folder),
        (empty, "-m", folder),
        (short, "-m", folder),
        (text, "-m", folder, "--cache", "full"),
        (text, "-m", folder, "--cache", "sink", "--window", 0),
        (text, "-m", folder, "--cache", "sink", "--sink-tokens", -1),
        (text, "-m", folder, "--cache", "sink", "--window", 61),
        (text, "-m", folder, "--cache", "recompute", "--window", 65),
        (text, "-m", folder, "--max-tokens", 0),
        (text, "-m", folder, "--every", 0),
        (text, "-m", folder, "--plot", tmp_path / "plot.jpg"),
        (text, "-m", folder, "-o", tmp_path / "no" / "such" / "folder.json"),
    ]
    for case in cases:
        code, _, err = cli("perplexity", *case)
        assert code == 2 and err.startswith("kvgen") and "error" in err and err.count("\n") == 1, (case, err)
    for policy in ("sink", "window"):
        code, _, err = cli("perplexity", text, "-m", gpt2_tiny, "--cache", f"dense,{policy}")
        assert code == 2 and "learned absolute position" in err
    code, out, _ = cli("perplexity", text, "-m", gpt2_tiny, "--cache", "dense,recompute", "--window", 30)
    assert code == 0 and "recompute" in out  # a fresh forward per token needs no movable keys
