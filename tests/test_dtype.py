"""dtype="auto": measured once per processor, remembered, and used by kvgen.load."""

import json

import pytest
import torch

import kvgen
from kvgen.loading import dtype as dtype_module
from kvgen.loading.dtype import fastest_dtype, resolve_dtype


def test_measured_once_then_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    times = {torch.float32: 2.0, torch.bfloat16: 1.0}
    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype: times[dtype])
    assert fastest_dtype() == torch.bfloat16
    (record,) = json.loads((tmp_path / "fastest-dtype.json").read_text()).values()
    assert record == {"dtype": "bfloat16", "float32_s": 2.0, "bfloat16_s": 1.0}

    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype: pytest.fail("measured twice"))
    assert fastest_dtype() == torch.bfloat16
    assert resolve_dtype("auto") == torch.bfloat16 and resolve_dtype("float16") == torch.float16


def test_slower_bfloat16_means_float32(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype: 1.0 if dtype == torch.float32 else 3.0)
    assert fastest_dtype() == torch.float32
    assert fastest_dtype("meta") == torch.bfloat16  # not a CPU: bfloat16 without measuring


def test_real_measurement_and_load(tmp_path, monkeypatch, gpt2_tiny):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    chosen = fastest_dtype()
    assert chosen in (torch.float32, torch.bfloat16)
    assert kvgen.load(gpt2_tiny).dtype == chosen  # "auto" is the default


def test_unwritable_cache_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KVGEN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype: 1.0 if dtype == torch.float32 else 3.0)
    assert fastest_dtype() == torch.float32
