"""dtype="auto": measured once per processor, remembered, and used by kvgen.load."""

import json

import pytest
import torch

import kvgen
from kvgen.loading import dtype as dtype_module
from kvgen.loading.dtype import fastest_dtype, packing_pays, quantized_pays, resolve_dtype


def test_measured_once_then_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    times = {torch.float32: 2.0, torch.bfloat16: 1.0}
    speedup = {"": 1, "_packed": 2, "_int8": 1.5, "_int4": 4, "_int4_kvgen": 5}
    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype, kernel="": times[dtype] / speedup[kernel])
    assert fastest_dtype() == torch.bfloat16
    (record,) = json.loads((tmp_path / "fastest-dtype.json").read_text()).values()
    assert record["dtype"] == "bfloat16"
    assert record["float32_packed_s"] == 1.0 and record["bfloat16_s"] == 1.0 and record["bfloat16_packed_s"] == 0.5
    assert packing_pays(torch.bfloat16) and packing_pays(torch.float32)
    assert quantized_pays(torch.bfloat16) == ("bfloat16_int4_s" in record)  # int4 4x; int8 slower than packed

    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype, kernel="": pytest.fail("measured twice"))
    assert fastest_dtype() == torch.bfloat16 and packing_pays(torch.bfloat16)
    assert resolve_dtype("auto") == torch.bfloat16 and resolve_dtype("float16") == torch.float16


def test_slower_bfloat16_means_float32(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(
        dtype_module, "_seconds_per_matvec", lambda dtype, kernel="": 1.0 if dtype == torch.float32 else 3.0
    )
    assert fastest_dtype() == torch.float32
    assert fastest_dtype("meta") == torch.bfloat16  # not a CPU: bfloat16 without measuring


def test_packed_kernel_counts_toward_the_choice(tmp_path, monkeypatch):
    """bfloat16's F.linear is slower than float32's here, but its packed kernel is the fastest of all."""
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    times = {
        (torch.float32, ""): 2.0,
        (torch.float32, "_packed"): 2.5,
        (torch.bfloat16, ""): 3.0,
        (torch.bfloat16, "_packed"): 1.0,
    }
    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype, kernel="": times.get((dtype, kernel), 9.0))
    assert fastest_dtype() == torch.bfloat16
    assert packing_pays(torch.bfloat16) and not packing_pays(torch.float32)
    assert not quantized_pays(torch.bfloat16)  # its int kernels (9 s) are slower than the float ones here
    assert not packing_pays(torch.float16) and not packing_pays(torch.bfloat16, "meta")


def test_a_record_without_packed_times_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    key = f"{dtype_module._processor()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    (tmp_path / "fastest-dtype.json").write_text(
        json.dumps({key: {"dtype": "float32", "float32_s": 1.0, "bfloat16_s": 2.0}})
    )
    monkeypatch.setattr(dtype_module, "_seconds_per_matvec", lambda dtype, kernel="": 0.5 if kernel else 1.0)
    assert packing_pays(torch.float32)
    assert set(json.loads((tmp_path / "fastest-dtype.json").read_text())[key]) >= {
        "float32_packed_s",
        "bfloat16_packed_s",
    }


def test_real_measurement_and_load(tmp_path, monkeypatch, gpt2_tiny):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    chosen = fastest_dtype()
    assert chosen in (torch.float32, torch.bfloat16)
    assert kvgen.load(gpt2_tiny).dtype == chosen  # "auto" is the default


def test_unwritable_cache_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KVGEN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(
        dtype_module, "_seconds_per_matvec", lambda dtype, kernel="": 1.0 if dtype == torch.float32 else 3.0
    )
    assert fastest_dtype() == torch.float32
