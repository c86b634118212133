"""The `kvgen` command: output documents, exit statuses, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch


def test_generate_json_has_exactly_n_tokens(cli, gpt2_tiny):
    code, out, _ = cli("generate", "It was the best", "-m", gpt2_tiny, "-n", 17, "--ignore-eos", "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["token_ids"]) == 17 and doc["finish_reason"] == "length"
    assert set(doc) == {"text", "token_ids", "prompt_ids", "finish_reason", "timings"}
    assert doc["timings"]["decode_tok_s"] > 0


def test_generate_streams_text_and_timings(cli, gpt2_tiny):
    args = ("generate", "Call me", "-m", gpt2_tiny, "-n", 12, "--ignore-eos", "--dtype", "float32")
    code, out, err = cli(*args, "--cache", "static")
    code_json, doc, _ = cli(*args, "--json")
    assert code == code_json == 0
    assert out == json.loads(doc)["text"] + "\n"
    assert "decode 12 tok" in err and "[length]" in err


def test_generate_with_quantized_weights(cli, gpt2_tiny):
    """--quantize int8 on a float checkpoint: the same command, other weights; --quantize none is the
    reference path, whose tokens are the default's on a float checkpoint (nothing is quantized)."""
    args = ("generate", "It was the best", "-m", gpt2_tiny, "-n", 12, "--ignore-eos", "--json", "--dtype", "float32")
    code, out, _ = cli(*args)
    code_ref, out_ref, _ = cli(*args, "--quantize", "none")
    code_q, out_q, _ = cli(*args, "--quantize", "int8")
    assert code == code_ref == code_q == 0
    assert json.loads(out)["token_ids"] == json.loads(out_ref)["token_ids"]
    assert len(json.loads(out_q)["token_ids"]) == 12


def test_version_defaults_and_info_by_option(cli, gpt2_tiny):
    from importlib.metadata import version

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"kvgen {version('kvgen')}"
    code, out, _ = cli("generate", "--help")
    assert code == 0 and "default 64" in out  # -n's default, as each command sets it
    code, out, _ = cli("chat", "--help")
    assert "default 256" in out
    code, by_option, _ = cli("info", "-m", gpt2_tiny)
    code_positional, positional, _ = cli("info", gpt2_tiny)
    assert code == code_positional == 0 and by_option == positional and "gpt2" in by_option


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(cli, gpt2_tiny):
    code, _, err = cli("generate", "hi", "-m", gpt2_tiny, "--device", "cuda")
    assert code == 2 and err.startswith("kvgen: error: device 'cuda': ") and err.count("\n") == 1, err


def test_compare_reports_identical(cli, gpt2_tiny):
    code, out, _ = cli("compare", "It was the best", "-m", gpt2_tiny, "-n", 48, "--ignore-eos", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["identical"] and doc["first_difference"] is None
    assert doc["hf"]["token_ids"] == doc["native"]["token_ids"] and len(doc["native"]["token_ids"]) == 48
    code, out, _ = cli("compare", "It was the best", "-m", gpt2_tiny, "-n", 8)
    assert code == 0 and "identical" in out and "way 1" in out and "way 2" in out


BAD = {
    "missing model": (["generate", "hi", "-m", "/no/such/model"], "model not found"),
    "not a model folder": (["generate", "hi", "-m", "{tmp}"], "not a model folder"),
    "unknown cache": (["generate", "hi", "-m", "{model}", "--cache", "paged"], "invalid choice: 'paged'"),
    "unknown dtype": (["generate", "hi", "-m", "{model}", "--dtype", "int3"], "invalid choice: 'int3'"),
    "unknown backend": (["generate", "hi", "-m", "{model}", "--backend", "onnx"], "invalid choice: 'onnx'"),
    "empty prompt": (["generate", "", "-m", "{model}"], "prompt is empty"),
    "zero tokens": (["generate", "hi", "-m", "{model}", "-n", "0"], "must be at least 1"),
    "negative tokens": (["generate", "hi", "-m", "{model}", "-n", "-3"], "must be at least 1"),
    "top-p zero": (["generate", "hi", "-m", "{model}", "--top-p", "0"], "top_p must be in (0, 1]"),
    "top-p above one": (["compare", "hi", "-m", "{model}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    "context overflow": (["generate", "hi", "-m", "{model}", "-n", "300"], "exceeds the model's context of 256"),
    "not a number": (["generate", "hi", "-m", "{model}", "-n", "many"], "not a whole number"),
    "no command": ([], "required"),
    "unknown quantization": (["generate", "hi", "-m", "{model}", "--quantize", "int3"], "invalid choice: 'int3'"),
    "unknown device": (["generate", "hi", "-m", "{model}", "--device", "bogus"], "unknown device 'bogus'"),
    "window without the sink cache": (["generate", "hi", "-m", "{model}", "--window", "8"], "add --cache sink"),
    "sink tokens without the sink cache": (["generate", "hi", "-m", "{model}", "--sink-tokens", "2"], "add --cache sink"),
    "info named twice": (["info", "{model}", "-m", "{tmp}"], "name the model once"),
    "quantized transformers": (["generate", "hi", "-m", "{model}", "--backend", "hf", "--quantize", "int8"], "needs the native backend"),
    "quantized on a GPU": (["generate", "hi", "-m", "{model}", "--quantize", "int4", "--device", "meta"], "CPU kernels only"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(cli, gpt2_tiny, tmp_path, case):
    args, message = BAD[case]
    args = [a.format(tmp=tmp_path, model=gpt2_tiny) for a in args]
    code, _, err = cli(*args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_real_process_exit_status(gpt2_tiny):
    """The installed entry point, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "kvgen", "generate", "", "-m", str(gpt2_tiny)], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip() == "kvgen: error: prompt is empty"
