"""`kvgen bench`: the JSON schema, the plot, one-line errors, the missing-llama.cpp path, weight bytes."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import kvgen
from kvgen.bench import (
    RESULT_KEYS,
    Worker,
    gguf_bytes_per_token,
    gguf_tensor_bytes,
    schedule,
    weight_bytes_per_token,
)
from kvgen.cli import main
from kvgen.testing import build_gemma3


@pytest.fixture(scope="module")
def gemma3_tiny(tmp_path_factory):
    return build_gemma3(tmp_path_factory.mktemp("gemma3-tiny"))


@pytest.fixture(scope="module")
def bench_run(gemma3_tiny, tmp_path_factory):
    """One real `kvgen bench` against transformers and llama.cpp, with llama-cpp-python hidden (a
    package on PYTHONPATH that fails to import), as a user runs it: (process, JSON document, PNG path)."""
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "hide" / "llama_cpp").mkdir(parents=True)
    (tmp / "hide" / "llama_cpp" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp / "hide"), os.environ.get("PYTHONPATH")])))
    args = ["-m", gemma3_tiny, "-o", tmp / "out.json", "--plot", tmp / "out.png", "--dtype", "float32"]
    args += ["--new-tokens", 8, "--prompt-tokens", 16, "--batch", "1,2", "--against", "hf,llama.cpp", "--threads", 1]
    args += ["--reference"]
    done = subprocess.run(
        [sys.executable, "-m", "kvgen", "bench", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done, json.loads((tmp / "out.json").read_text()), tmp / "out.png"


def test_json_has_the_schema_and_one_result_per_system_and_batch(bench_run):
    _, doc, _ = bench_run
    assert {"machine", "results"} <= set(doc)
    machine = doc["machine"]
    assert machine["cpu"] and machine["torch"] == torch.__version__ and machine["threads"] == 1
    assert machine["memory_read_gb_s"] > 0 and isinstance(machine["cpu_flags"], list)
    assert sorted((r["system"], r["batch"]) for r in doc["results"]) == [
        ("hf", 1),
        ("hf", 2),
        ("kvgen", 1),
        ("kvgen", 2),
        ("kvgen-reference", 1),
        ("kvgen-reference", 2),
    ]
    for r in doc["results"]:
        assert list(r)[: len(RESULT_KEYS)] == list(RESULT_KEYS)
        for key in RESULT_KEYS[1:]:
            assert isinstance(r[key], float) and r[key] > 0, (r["system"], key, r[key])
        assert r["peak_rss_mb"] < 1000  # the worker's own peak, not the parent's (which holds a 1 GiB probe)
        assert len(r["tokens"]) == 8 and r["weights"] == "float32"
        assert len(r["decode_tok_s_runs"]) == 3 and statistics.median(r["decode_tok_s_runs"]) == r["decode_tok_s"]
        assert r["bandwidth_pct"] == pytest.approx(100 * r["gb_s"] / machine["memory_read_gb_s"])
    kvgen_1 = next(r for r in doc["results"] if r["system"] == "kvgen" and r["batch"] == 1)
    hf_1 = next(r for r in doc["results"] if r["system"] == "hf" and r["batch"] == 1)
    assert kvgen_1["tokens"] == hf_1["tokens"]  # the same prompt ids reached both, greedy, float32
    assert hf_1["tokens_match_kvgen"] is True and "tokens_match_kvgen" not in kvgen_1
    reference = [r for r in doc["results"] if r["system"] == "kvgen-reference"]
    assert all(r["tokens_match_kvgen"] is True for r in reference)  # a float checkpoint: the same weights


def test_missing_llama_cpp_says_how_to_get_it_and_the_others_run(bench_run):
    done, doc, _ = bench_run
    skipped = [line for line in done.stderr.splitlines() if "skipping llama.cpp" in line]
    assert len(skipped) == 1 and "pip install 'kvgen[bench]'" in skipped[0] and "hidden by the test" in skipped[0]
    assert {r["system"] for r in doc["results"]} == {"kvgen", "kvgen-reference", "hf"}
    assert "kvgen" in done.stdout and "transformers" in done.stdout and "decode tok/s" in done.stdout
    assert "MB/token" in done.stdout  # the weight bytes a decode step reads


def test_plot_is_a_png(bench_run):
    import matplotlib.image

    image = matplotlib.image.imread(bench_run[2])
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # drawn, not blank


BAD = {
    "zero batch": (["--batch", "0"], "batch sizes must be whole numbers of at least 1"),
    "batch not a number": (["--batch", "1,x"], "expected batch sizes such as 1,8"),
    "unknown peer": (["--against", "vllm"], "unknown system 'vllm'"),
    "one new token": (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    "plot not png": (["--plot", "{tmp}/out.txt"], "name the file *.png"),
    "json folder missing": (["-o", "{tmp}/no/such/out.json"], "does not exist"),
    "context overflow": (["--prompt-tokens", "250", "--new-tokens", "64"], "exceed the model's context of 256"),
    "missing model": (["-m", "/no/such/model"], "model not found"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_flags_are_one_line_exit_2(capsys, gemma3_tiny, tmp_path, case):
    args, message = BAD[case]
    args = ["bench", "-m", str(gemma3_tiny), *(a.format(tmp=tmp_path) for a in args)]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_weight_bytes_count_a_tied_head_once_and_one_row_of_a_lookup_table(gpt2_tiny):
    """GPT-2's wte is also its LM head (read whole every step); wpe is only looked up (one row)."""
    hf = kvgen.load(gpt2_tiny, dtype="float32", backend="hf").model
    every = sum(p.numel() * 4 for p in hf.parameters())  # transformers ties wte and lm_head: counted once
    wpe = hf.transformer.wpe.weight
    expected = every - wpe.numel() * 4 + wpe.shape[1] * 4
    assert weight_bytes_per_token(hf) == expected
    assert weight_bytes_per_token(kvgen.load(gpt2_tiny, dtype="float32").model) == expected
    # int8 rows: a byte a weight and a scale a row, the float32 norms, biases and position table aside
    quantized = weight_bytes_per_token(kvgen.load(gpt2_tiny, dtype="float32", quantize="int8").model)
    assert expected / 4 < quantized < expected / 4 * 1.5


def test_a_quantized_lookup_table_counts_one_row():
    """An untied model's quantized embedding is read a row a token, not whole (its packed values are
    one tensor of every row: their first index is not a row)."""
    from kvgen.quant import QuantEmbedding, QuantLinear

    def quantized(rows):
        return QuantLinear.quantize(torch.randn(rows, 64), "int4", torch.float32, bits=5)

    model = torch.nn.Module()
    model.embed, model.lm_head = QuantEmbedding(quantized(256)), quantized(128)
    size = lambda q: sum(t.numel() * t.element_size() for t in q.buffers())  # noqa: E731
    assert weight_bytes_per_token(model) == size(model.lm_head) + size(model.embed.table) // 256


def test_gguf_bytes_of_the_default_model_include_its_tied_embedding():
    path = kvgen.loading.default_model()
    sizes = gguf_tensor_bytes(path)
    assert "output.weight" not in sizes  # Gemma 3 ties its head: token_embd is read whole every step
    assert gguf_bytes_per_token(sizes) == sum(sizes.values())
    assert 100e6 < gguf_bytes_per_token(sizes) < path.stat().st_size
    untied = {**sizes, "output.weight": sizes["token_embd.weight"]}  # a separate head: the table is a lookup
    assert gguf_bytes_per_token(untied) == sum(sizes.values())


def test_runs_take_turns_in_rotating_rounds_after_every_warm_up():
    order = schedule({"kvgen": [1, 8], "hf": [1, 8], "llama.cpp": [1]}, repeats=2)
    warm_up_1 = [("kvgen", 1, False), ("hf", 1, False), ("llama.cpp", 1, False)]
    rounds_1 = [("kvgen", 1, True), ("hf", 1, True), ("llama.cpp", 1, True)]
    rounds_1 += [("hf", 1, True), ("llama.cpp", 1, True), ("kvgen", 1, True)]
    at_8 = [("kvgen", 8, False), ("hf", 8, False), ("kvgen", 8, True), ("hf", 8, True)]
    at_8 += [("hf", 8, True), ("kvgen", 8, True)]
    assert order == warm_up_1 + rounds_1 + at_8


def test_a_worker_that_cannot_load_says_why_in_one_line(capsys):
    spec = dict(system="kvgen", model="/no/such/model", dtype="float32", threads=1, ids=[1, 2], new_tokens=2)
    worker = Worker(spec)
    worker.close()
    assert worker.loaded is None
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("kvgen bench: kvgen failed (exit status 1):")
    assert "model not found" in message[0]
