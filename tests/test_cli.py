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


TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 4

# Every command that makes a JSON document, on the tiny GPT-2 ({model}; {text} is a text file).
DOCUMENTS = {
    "generate": (["generate", "It was", "-m", "{model}", "-n", "6", "--ignore-eos", "--dtype", "float32"], "token_ids"),
    "compare": (["compare", "It was", "-m", "{model}", "-n", "6", "--ignore-eos"], "identical"),
    "compare caches": (["compare", "It was", "-m", "{model}", "-n", "4", "--caches", "dynamic,static"], "results"),
    "trace": (["trace", "It was", "-m", "{model}", "-n", "3"], "steps"),
    "perplexity": (["perplexity", "{text}", "-m", "{model}", "--cache", "dense", "--max-tokens", "30"], "runs"),
    "quality": (["quality", "{text}", "-m", "{model}", "--dtype", "bfloat16", "--tokens", "30"], "mean_kld"),
}


@pytest.mark.parametrize("command", DOCUMENTS)
def test_json_prints_and_output_writes_the_same_document(cli, gpt2_tiny, tmp_path, command):
    """--json means one thing everywhere: the document on stdout in place of the human output;
    -o FILE writes that document to FILE (atomically) beside the human output."""
    (tmp_path / "text.txt").write_text(TEXT)
    args, key = DOCUMENTS[command]
    args = [a.format(model=gpt2_tiny, text=tmp_path / "text.txt") for a in args]
    out_file = tmp_path / "doc.json"
    code, out, err = cli(*args, "--json", "-o", out_file)
    assert code == 0, err
    printed = json.loads(out)  # stdout is the document and nothing else
    assert key in printed and json.loads(out_file.read_text()) == printed
    out_file.unlink()
    code, out, err = cli(*args, "-o", out_file)
    assert code == 0, err
    assert key in json.loads(out_file.read_text())
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)  # the text or table, as without -o
    assert out.strip() and not list(tmp_path.glob(".*.tmp"))


def test_stop_token_ids_match_the_text(cli, gpt2_tiny):
    """With --stop, `token_ids` are the tokens that made `text`: decoding them gives `text`, plus the
    rest of the last token where the stop string began inside it; the tokens that only spelled the
    stop string are gone. Checked against the run without --stop, decoded here by transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tiny)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    args = ("generate", "It was the best of times", "-m", gpt2_tiny, "-n", 24, "--ignore-eos", "--json")
    free = json.loads(cli(*args)[1])
    ids, text = free["token_ids"], free["text"]
    assert decode(ids) == text
    # A token of three or more letters, and its text from the second character, each first found at
    # the token's place in the text.
    k = next(
        k
        for k in range(1, len(ids))
        if len(token := decode(ids[k : k + 1])) >= 3
        and token.strip().isalpha()
        and text.find(token) == len(decode(ids[:k]))
        and text.find(token[1:]) == len(decode(ids[:k])) + 1
    )
    start, token = len(decode(ids[:k])), decode(ids[k : k + 1])
    for offset in (0, 1):  # the stop string is token k, then token k less its first character
        code, out, _ = cli(*args, "--stop", token[offset:])
        doc = json.loads(out)
        assert code == 0 and doc["finish_reason"] == "stop"
        assert doc["text"] == text[: start + offset]
        assert doc["token_ids"] == ids[: k + offset]  # token k is kept where it gave the text a character
        assert decode(doc["token_ids"]) == doc["text"] + token[offset:] * offset
        assert doc["timings"]["new_tokens"] == k + 1  # every token generated is still counted


@pytest.fixture(scope="module")
def llama_64(tmp_path_factory):
    from kvgen.testing import build_llama

    return build_llama(tmp_path_factory.mktemp("llama-64"), max_position_embeddings=64)


def test_perplexity_names_sink_tokens_as_generate(cli, llama_64, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ("perplexity", text, "-m", llama_64, "--cache", "sink", "--window", 20, "--max-tokens", 60, "--json")
    code, out, err = cli(*args, "--sink-tokens", 2)
    (run,) = json.loads(out)["runs"]
    assert code == 0 and run["sinks"] == 2 and "note" not in err
    code, out_old, err_old = cli(*args, "--sinks", 2)  # the old spelling still works, and says what replaced it
    assert code == 0 and json.loads(out_old)["runs"][0]["nll"] == run["nll"]
    assert err_old.splitlines()[0] == "kvgen: note: --sinks is now --sink-tokens"  # then the progress bar
    _, help_text, _ = cli("perplexity", "--help")
    assert "--sink-tokens" in help_text and "--sinks" not in help_text


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
    "sink tokens without the sink cache": (
        ["generate", "hi", "-m", "{model}", "--sink-tokens", "2"],
        "add --cache sink",
    ),
    "info named twice": (["info", "{model}", "-m", "{tmp}"], "name the model once"),
    "quantized transformers": (
        ["generate", "hi", "-m", "{model}", "--backend", "hf", "--quantize", "int8"],
        "needs the native backend",
    ),
    "quantized on a GPU": (
        ["generate", "hi", "-m", "{model}", "--quantize", "int4", "--device", "meta"],
        "CPU kernels only",
    ),
    "output in a missing folder": (["generate", "hi", "-m", "{model}", "-o", "{tmp}/no/out.json"], "does not exist"),
    "json given a file": (["generate", "hi", "-m", "{model}", "--json", "{tmp}/out.json"], "unrecognized arguments"),
    "sink tokens without the sink policy": (
        ["perplexity", "-m", "{model}", "--cache", "dense", "--sink-tokens", "2"],
        "add --cache sink",
    ),
    "negative token limit": (["serve", "-m", "{model}", "--max-tokens-limit", "-1"], "must be at least 0"),
    "empty prefill chunks": (["serve", "-m", "{model}", "--prefill-chunk", "0"], "must be at least 1"),
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
