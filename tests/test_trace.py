"""Tracing: exact per-step shapes for each cache kind, the CLI's table, JSON and plots, and that an
untraced run keeps no records."""

import json

import pytest

import kvgen
import kvgen.generate
from kvgen.models import layers
from kvgen.testing import build_gemma3
from kvgen.trace import compare_figure, trace_figure

PROMPT = "It was the best of times"
N = 6
WINDOW = 4  # the tiny Gemma 3's sliding window: shorter than the prompt, so it wraps during prefill


@pytest.fixture(scope="module")
def gpt2(gpt2_tiny):
    return kvgen.load(gpt2_tiny, dtype="float32")


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    # Layer 0 slides over the last WINDOW tokens, layer 1 is global.
    return build_gemma3(tmp_path_factory.mktemp("gemma3-tiny"), sliding_window=WINDOW)


@pytest.fixture(scope="module")
def gemma3(gemma3_folder):
    return kvgen.load(gemma3_folder, dtype="float32")


def check_step_basics(lm, result, vocab):
    T = len(result.prompt_ids)
    assert len(result.trace) == N and [s.index for s in result.trace] == list(range(N))
    assert [s.chosen[0].id for s in result.trace] == result.token_ids
    for i, step in enumerate(result.trace):
        assert step.phase == ("prefill" if i == 0 else "decode")
        assert step.input_ids == ((1, T) if i == 0 else (1, 1))
        assert step.positions == ([list(range(T))] if i == 0 else [[T + i - 1]])
        assert step.logits == (1, vocab)  # the last position only, even at prefill
        assert len(step.top[0]) == 5 and step.top[0][0].prob >= step.top[0][-1].prob
        assert step.chosen[0].id == step.top[0][0].id  # greedy picks the most probable
        assert step.cache_bytes == sum(layer.nbytes for layer in step.layers) > 0 and step.seconds > 0
    return T


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpt2_shapes(gpt2, cache):
    heads, head_dim, n_layers, vocab = 4, 16, 2, len(gpt2.tokenizer)  # build_gpt2's config: n_embd 64, n_head 4
    result = gpt2.generate(PROMPT, N, cache=cache, trace=True, stop_at_eos=False)
    assert result.token_ids == gpt2.generate(PROMPT, N, cache=cache, stop_at_eos=False).token_ids
    T = check_step_basics(gpt2, result, vocab)
    for i, step in enumerate(result.trace):
        rows = T if i == 0 else 1
        assert len(step.layers) == n_layers
        for layer in step.layers:
            assert layer.kind == cache and layer.window is None and layer.length == T + i
            if cache == "dynamic":  # grows by one token per decode step
                assert layer.keys == layer.values == (1, heads, T + i, head_dim)
                assert layer.allocated is None and layer.index is None
                assert layer.mask == (1, 1, rows, T + i)
            else:  # allocated once for prompt + new tokens; the write index moves, the shape does not
                assert layer.keys == layer.values == (1, heads, T + N, head_dim)
                assert layer.allocated == T + N and layer.index == T + i
                assert layer.mask == (1, 1, rows, T + N)
            assert layer.nbytes == 2 * 4 * layer.keys[1] * layer.keys[2] * head_dim  # float32 K and V


def test_gemma3_sliding_layers_differ(gemma3):
    kv_heads, head_dim, vocab = 2, 16, len(gemma3.tokenizer)
    dynamic = gemma3.generate(PROMPT, N, trace=True, stop_at_eos=False)
    static = gemma3.generate(PROMPT, N, cache="static", trace=True, stop_at_eos=False)
    assert dynamic.token_ids == static.token_ids == gemma3.generate(PROMPT, N, stop_at_eos=False).token_ids
    T = check_step_basics(gemma3, dynamic, vocab)
    check_step_basics(gemma3, static, vocab)
    assert T > WINDOW
    for i, (d, s) in enumerate(zip(dynamic.trace, static.trace)):
        rows = T if i == 0 else 1
        sliding, full = d.layers
        # The dynamic sliding layer keeps window - 1 entries; attention saw those plus the new ones.
        assert sliding.window == WINDOW and sliding.keys == sliding.values == (1, kv_heads, WINDOW - 1, head_dim)
        assert sliding.mask == ((1, 1, T, T) if i == 0 else (1, 1, 1, WINDOW))
        assert full.window is None and full.keys == (1, kv_heads, T + i, head_dim) and full.mask == (1, 1, rows, T + i)
        ring, static_full = s.layers
        # The static sliding layer is a ring of `window` slots, written at (tokens so far) % window.
        assert ring.kind == "ring" and ring.keys == ring.values == (1, kv_heads, WINDOW, head_dim)
        assert ring.allocated == WINDOW and ring.length == WINDOW and ring.index == (T + i) % WINDOW
        assert ring.mask == ((1, 1, T, WINDOW + T) if i == 0 else (1, 1, 1, WINDOW))
        assert static_full.kind == "static" and static_full.keys == (1, kv_heads, T + N, head_dim)
        assert static_full.index == T + i and static_full.mask == (1, 1, rows, T + N)


def test_untraced_run_keeps_no_records(gpt2, monkeypatch):
    def no_step(*args, **kwargs):
        raise AssertionError("a Step was built without an observer")

    monkeypatch.setattr(kvgen.generate, "Step", no_step)
    result = gpt2.generate(PROMPT, 4, stop_at_eos=False)
    assert result.trace is None and "trace" not in result.as_dict() and layers.attention_probe is None


def test_trace_needs_native_backend(gpt2_tiny):
    lm = kvgen.load(gpt2_tiny, dtype="float32", backend="hf")
    with pytest.raises(ValueError, match="native backend"):
        lm.generate(PROMPT, 2, trace=True)


def assert_png(path, width, height):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)
    rgb = image[..., :3]
    assert rgb.std() > 0.05 and (rgb.mean(-1) < 0.9).mean() > 0.01  # not blank: drawn lines and text


def test_cli_trace_table_json_plot(cli, gemma3_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # an 80-column terminal (rich reads $COLUMNS): the table must fit it
    args = ("trace", PROMPT, "-m", gemma3_folder, "-n", N, "--ignore-eos", "--dtype", "float32", "--cache", "static")
    code, out, _ = cli(*args, "-o", tmp_path / "t.json", "--plot", tmp_path / "t.png")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80, out
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["cache"] == "static" and doc["prompt"] == PROMPT and len(doc["steps"]) == N
    steps = doc["steps"]
    T, vocab = steps[0]["input_ids"][1], steps[0]["logits"][1]
    assert steps[0]["phase"] == "prefill" and steps[1]["input_ids"] == [1, 1]
    assert [layer["kind"] for layer in steps[0]["layers"]] == ["ring", "static"]
    lines = [line.strip() for line in out.splitlines()]
    # Step 0's cells, each phrase on a line of its own: nothing is cut mid-phrase at 80 columns.
    for text in (f"(1, {T}) at", f"[0..{T - 1}]", f"→ (1, {vocab})", "L0, window 4", f"mask (1, 1, {T}, {WINDOW + T})"):
        assert any(line.startswith(text) or f" {text}" in line for line in lines), text
    for i, step in enumerate(steps):
        chosen = step["chosen"][0]
        assert f"{chosen['id']} {chosen['text']!r} {chosen['prob']:.3f}" in out
        assert "ring of 4" in out and f"allocated {T + N}" in out
        assert f"filled {T + i}, write @ {T + i}" in out and f"filled 4, write @ {(T + i) % 4}" in out
        assert ("prefill" if i == 0 else "decode") in out
    assert f"text: {doc['text']!r}" in out
    assert_png(tmp_path / "t.png", 1000, 340)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind

    # A long prompt and its text wrap too; nothing in the table is wider than the terminal.
    code, out, _ = cli("trace", PROMPT * 8, "-m", gemma3_folder, "-n", 2, "--dtype", "float32")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80, out


def test_cli_attention_plot(cli, gemma3_folder, tmp_path):
    code, _, _ = cli(
        "trace",
        PROMPT,
        "-m",
        gemma3_folder,
        "-n",
        N,
        "--ignore-eos",
        "--dtype",
        "float32",
        "--attention",
        "1,3",
        "--plot",
        tmp_path / "a.png",
        "-o",
        tmp_path / "a.json",
    )
    assert code == 0
    steps = json.loads((tmp_path / "a.json").read_text())["steps"]
    T = steps[0]["input_ids"][1]
    for i, step in enumerate(steps):
        weights = step["attention"]
        assert len(weights) == T + i  # the last query sees positions 0 .. itself
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert layers.attention_probe is None
    assert_png(tmp_path / "a.png", 700, 150 + 25 * N)


def test_cli_compare_caches(cli, gpt2_tiny, tmp_path):
    code, out, _ = cli(
        "compare",
        PROMPT,
        "-m",
        gpt2_tiny,
        "-n",
        N,
        "--ignore-eos",
        "--caches",
        "dynamic,static",
        "--plot",
        tmp_path / "c.png",
        "--json",
    )
    doc = json.loads(out)
    assert code == 0 and doc["identical"] and doc["first_difference"] == {"static": None}
    assert doc["results"]["dynamic"]["token_ids"] == doc["results"]["static"]["token_ids"]
    assert doc["peak_cache_bytes"]["static"] >= doc["peak_cache_bytes"]["dynamic"]
    assert_png(tmp_path / "c.png", 900, 340)
    code, out, _ = cli("compare", PROMPT, "-m", gpt2_tiny, "-n", 4, "--caches", "static,dynamic")
    assert code == 0 and "identical" in out and "static cache" in out


def test_figures_show_the_series(gpt2):
    dynamic = gpt2.generate(PROMPT, N, trace=True, stop_at_eos=False).trace
    static = gpt2.generate(PROMPT, N, cache="static", trace=True, stop_at_eos=False).trace

    def labels(fig):
        return [ax.get_title() for ax in fig.axes], [
            t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()
        ]

    titles, legend = labels(trace_figure(static))
    assert titles == ["cache length", "cache bytes", "step time"]
    assert {"global layers: stored", "global layers: allocated", "prefill", "decode"} <= set(legend)
    fig = trace_figure(dynamic)
    stored = fig.axes[0].get_lines()[0].get_ydata()
    assert list(stored) == [len(gpt2.encode(PROMPT)) + i for i in range(N)]  # the dynamic cache grows
    titles, legend = labels(compare_figure({"dynamic": dynamic, "static": static}))
    assert titles[0] == "cache bytes" and legend.count("dynamic cache") == 2 and legend.count("static cache") == 2


BAD = {
    "unknown cache kind": (
        ["compare", "hi", "-m", "{model}", "--caches", "dynamic,paged"],
        "unknown cache kind 'paged'",
    ),
    "one cache kind": (["compare", "hi", "-m", "{model}", "--caches", "static"], "at least two different"),
    "bad attention spec": (
        ["trace", "hi", "-m", "{model}", "--attention", "x", "--plot", "{tmp}/a.png"],
        "LAYER or LAYER,HEAD",
    ),
    "layer out of range": (
        ["trace", "hi", "-m", "{model}", "--attention", "9", "--plot", "{tmp}/a.png"],
        "layer 9 is out of range",
    ),
    "head out of range": (
        ["trace", "hi", "-m", "{model}", "--attention", "0,9", "--plot", "{tmp}/a.png"],
        "head 9 is out of range",
    ),
    "attention without plot": (["trace", "hi", "-m", "{model}", "--attention", "0"], "give --plot"),
    "plot in missing folder": (["trace", "hi", "-m", "{model}", "--plot", "{tmp}/no/such/p.png"], "does not exist"),
    "json in missing folder": (["trace", "hi", "-m", "{model}", "-o", "{tmp}/no/t.json"], "does not exist"),
    "json given a file": (["trace", "hi", "-m", "{model}", "--json", "{tmp}/t.json"], "unrecognized arguments"),
    "plot not png": (["compare", "hi", "-m", "{model}", "--caches", "dynamic,static", "--plot", "{tmp}/p.jpg"], "PNG"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(cli, gpt2_tiny, tmp_path, case):
    args, message = BAD[case]
    code, _, err = cli(*[a.format(tmp=tmp_path, model=gpt2_tiny) for a in args])
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert layers.attention_probe is None


def test_docs_script_writes_the_page(gemma3_folder, tmp_path, cli):
    """scripts/how_generation_works.py on the tiny Gemma 3: real shapes in the page, plots beside it."""
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "how_generation_works.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--model", str(gemma3_folder), "--out", str(tmp_path), "-n", "3", "--prompt", PROMPT]) == 0
    page = (tmp_path / "how-generation-works.md").read_text()
    lm = kvgen.load(gemma3_folder, dtype="float32")
    T, vocab = len(lm.encode(PROMPT)), len(lm.tokenizer)
    assert f"| 0 | prefill | (1, {T}) | 0..{T - 1} | (1, {vocab}) |" in page
    for i in range(1, 3):  # the global layer's dynamic cache grows; its static one keeps the allocated shape
        assert f"| {i} | decode | (1, 1) | {T + i - 1} | (1, {vocab}) |" in page
        assert f"| 1 | (1, 1, 1, {T + i}) | K,V (1, 2, {T + i}, 16) |" in page
        assert (
            f"| 1 | (1, 1, 1, {T + 3}) | K,V (1, 2, {T + 3}, 16) allocated, filled {T + i}, write @ {T + i} |" in page
        )
    assert f"| 0 | (1, 1, 1, {WINDOW}) | K,V (1, 2, {WINDOW - 1}, 16) (window {WINDOW}) |" in page
    for png in ("trace-dynamic.png", "trace-static.png", "compare-caches.png", "attention.png"):
        assert f"]({png})" in page
        assert_png(
            tmp_path / png,
            *{
                "trace-dynamic.png": (1000, 340),
                "trace-static.png": (1000, 340),
                "compare-caches.png": (900, 340),
                "attention.png": (700, 225),
            }[png],
        )
