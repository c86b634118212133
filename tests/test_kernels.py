"""kvgen's own int4 kernel (kvgen/kernels): the products it computes, its batch invariance, and how
it is built, kept and rebuilt. Against independent references: the weight dequantized and
multiplied in float64, the same row alone, a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from kvgen import kernels, quant
from kvgen.loading import dtype as dtype_module
from kvgen.quant import QuantLinear, int4_available

WHY_NOT = kernels.load("int4_mm") if int4_available() else "torch has no CPU int4 layout to share"
needs_kernel = pytest.mark.skipif(WHY_NOT is not None, reason=f"kvgen's int4 kernel is not here: {WHY_NOT}")


def weight(bits: int, rows: int = 192, cols: int = 352, seed: int = 0) -> QuantLinear:
    """A random weight as one int4 term (4 bits), one and a plane of high bits (5-7) or two (8 bits),
    3 blocks of rows, 11 groups."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return QuantLinear.quantize(w, "int4", torch.bfloat16, bits=bits)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13])
def test_products_are_the_dequantized_weights(bits, rows):
    """The kernel's rows are the float64 products of the same bfloat16 inputs with the weight's
    exact values (its int4 steps times bfloat16 scales), rounded once to bfloat16 (2^-9 of each
    value; float32 sums add far less)."""
    q = weight(bits)
    tensors = {name: t.float() if name == "scales_zeros" else t for name, t in q.state_dict().items()}
    exact = QuantLinear("int4", tensors).dequantize()
    x = torch.randn(rows, q.in_features).bfloat16()
    want = x.double() @ exact.double().T
    q.set_kernel("kvgen")
    got = q(x).double()
    assert got.shape == want.shape
    assert ((got - want).abs() <= 2**-8 * want.abs() + 1e-5 * want.abs().max()).all()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_a_rows_product_does_not_depend_on_its_batch(bits):
    """Rows go through the kernel up to eight at a time; each one's bits are the same alone or beside
    others."""
    q = weight(bits)
    q.set_kernel("kvgen")
    x = torch.randn(11, 1, q.in_features).bfloat16()
    together = q(x)
    for i in range(len(x)):
        assert torch.equal(q(x[i : i + 1]), together[i : i + 1]), i


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_a_non_finite_input_spoils_its_own_row_only(bits):
    """An 8-bit weight multiplies x as integers, which hold no NaN: a row with one gives NaN where
    float arithmetic would, and the rows beside it are untouched."""
    q = weight(bits)
    q.set_kernel("kvgen")
    x = torch.randn(3, q.in_features).bfloat16()
    alone = q(x[2:])
    x[1, 40] = float("nan")
    got = q(x)
    assert got[1].isnan().all() and torch.equal(got[2:], alone) and got[0].isfinite().all()


@needs_kernel
def test_the_kernels_scales_layout_holds_the_same_weight(monkeypatch):
    """Taking kvgen's kernel lays the scales out block by block: dequantizing and embedding lookups
    read the very same values, a prompt's banded products (dequantized by the kernel's library, band
    after band) the same weight, and going back restores the tensor."""
    q = weight(8, rows=320)
    before = q.scales_zeros.clone()
    whole, ids = q.dequantize(), torch.tensor([[0, 63], [64, 319]])
    prompt = torch.randn(1, 12, q.in_features).bfloat16()  # more than KERNEL_POSITIONS: banded
    monkeypatch.setattr(quant, "BAND_BYTES", 128 * q.in_features * 4)  # bands of 128 rows, the last short
    monkeypatch.setattr(quant, "_scratch", threading.local())
    want = prompt.double() @ whole.double().T
    (old,) = q.set_kernel("kvgen")
    assert torch.equal(old, before)  # what it no longer reads
    assert q.scales_zeros.shape == (1, 5, 11, 64, 2)  # one scale and zero a group, for both terms
    assert torch.equal(q.dequantize(), whole) and torch.equal(q.rows(ids), whole[ids])
    assert ((q(prompt).double() - want).abs() <= 2**-7 * want.abs() + 1e-4 * want.abs().max()).all()
    q.set_kernel("torch")
    assert torch.equal(q.scales_zeros, before)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("scales_alone", [False, True])
def test_the_kernels_dequantization_is_the_weight(bits, scales_alone):
    """What a prompt's product multiplies: a band of rows dequantized in one pass, transposed, each
    value (v - middle) * scale + zero rounded once; the two-step float32 of `dequantize` rounds
    twice, so a value may differ by one float32 step before both round to bfloat16."""
    w = torch.randn(320, 352, generator=torch.Generator().manual_seed(1))
    if scales_alone:  # a symmetric type's values: the kernel reads no zeros
        scale = w.view(320, -1, 32).abs().amax(-1) / (2 ** (bits - 1) - 1)
        v = torch.round(w / scale.repeat_interleave(32, -1)) + 2 ** (bits - 1)
        q = QuantLinear.groups(v, scale, -(2 ** (bits - 1)) * scale, torch.bfloat16, bits)
    else:
        q = QuantLinear.quantize(w, "int4", torch.bfloat16, bits=bits)
    whole = q.dequantize().float()
    q.set_kernel("kvgen")
    assert q.scales_zeros.dim() == (4 if scales_alone else 5)
    band = torch.empty(352, 192, dtype=torch.bfloat16)
    torch.ops.kvgen.int4_dequantize(q.packed, q.scales_zeros, q._high(), 128, band)
    assert ((band.T.float() - whole[128:]).abs() <= 2**-8 * whole[128:].abs() + 1e-6).all()


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_torchs_kernel_takes_a_high_bit_plane_as_two_terms(bits):
    """A 5- to 7-bit weight is kept as kvgen's kernel reads it, its low nibbles and a plane of high
    bits (6 to 8 bits a weight with the scales, against 9 for two terms); choosing torch's kernel
    unpacks it into two terms holding the very same weight, and hands back what it held."""
    q = weight(bits, rows=320)
    assert q.high.shape == (320, 352 * (bits - 4) // 8) and len(q.packed) == 1
    whole, ids = q.dequantize(), torch.tensor([[0, 63], [64, 319]])
    held = [q.packed, q.high, q.scales_zeros]
    old = q.set_kernel("torch")
    assert len(old) == 3 and all(a is b for a, b in zip(old, held))
    assert q.high is None and q.bits == 8 and len(q.packed) == 2
    assert torch.equal(q.dequantize(), whole) and torch.equal(q.rows(ids), whole[ids])
    x = torch.randn(3, 352).bfloat16()
    want = x.double() @ whole.double().T
    assert ((q(x).double() - want).abs().max() / want.abs().max()).item() < 2**-7


@needs_kernel
def test_a_damaged_library_is_built_again(tmp_path):
    """Built once into the kvgen cache, loaded from there by the next process, built again where the
    file is damaged, never a crash."""
    env = {**os.environ, "KVGEN_CACHE": str(tmp_path)}
    probe = (
        "import torch; from kvgen import kernels; assert kernels.load('int4_mm') is None; "
        "print(torch.ops.kvgen.int4_mm)"
    )

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    stale = tmp_path / "kernels" / "int4_mm-from-an-older-source.so"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    assert "building" in run()
    (library,) = (tmp_path / "kernels").glob("int4_mm-*.so")  # the stale one went
    assert "building" not in run()  # kept
    library.write_bytes(b"not a library")
    assert "building" in run()
    assert library.stat().st_size > 1000


def test_a_cpu_without_its_instructions_keeps_torchs_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(dtype_module, "cpu_name_and_flags", lambda: ("Some CPU", {"avx2", "fma"}))
    assert "lacks avx512f" in kernels.load.__wrapped__("int4_mm")
    assert not (tmp_path / "kernels").exists()  # nothing was built


def test_the_faster_kernel_is_chosen_per_machine(tmp_path, monkeypatch):
    """int4_kernel reads the per-processor measurement: kvgen's kernel only where it was faster, and
    only for bfloat16 on a CPU."""
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    for kvgen_s, want in [(0.5, "kvgen"), (2.0, "torch")]:
        times = {"dtype": "bfloat16", "bfloat16_int4_s": 1.0, "bfloat16_int4_kvgen_s": kvgen_s}
        monkeypatch.setattr(dtype_module, "kernel_times", lambda cache_dir=None, t=times: t)
        assert dtype_module.int4_kernel(torch.bfloat16) == want
        assert dtype_module.int4_kernel(torch.float32) == "torch"
        assert dtype_module.int4_kernel(torch.bfloat16, "meta") == "torch"


def test_a_failed_build_is_reported_once_and_not_retried(tmp_path, monkeypatch):
    """No compiler (or a compile error): the reason, torch's kernel kept, and no second try in
    later processes (the reason is kept beside where the library would be)."""
    monkeypatch.setenv("KVGEN_CACHE", str(tmp_path))
    flags = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "avx512_vnni"}
    monkeypatch.setattr(dtype_module, "cpu_name_and_flags", lambda: ("Some CPU", flags))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'kvgen_int4_mm'\nc++: not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    why = kernels.load.__wrapped__("int4_mm")
    assert "could not be built" in why and "c++: not found" in why
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: pytest.fail("built twice"))
    assert kernels.load.__wrapped__("int4_mm") == why


ATTENTION_WHY_NOT = kernels.load("attention")
needs_attention_kernel = pytest.mark.skipif(
    ATTENTION_WHY_NOT is not None, reason=f"kvgen's attention kernel is not here: {ATTENTION_WHY_NOT}"
)


def held(n: int, slots: int, left: bool) -> slice:
    """The slots a row of n tokens holds: the last n behind left padding, else the first n."""
    return slice(slots - n, slots) if left else slice(0, n)


def padded_rows(lengths: list[int], slots: int, left: bool, kv_heads: int, D: int, T: int = 1, seed: int = 0):
    """Keys and values of rows of unlike lengths in `slots` slots, the empty ones (position -1) in
    front (a left-padded batch) or behind (a static cache's tail), and each row's last T queries'
    positions. Keys scaled so that the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    k = (3 * torch.randn(len(lengths), kv_heads, slots, D, generator=g)).bfloat16()
    v = torch.randn(len(lengths), kv_heads, slots, D, generator=g).bfloat16()
    key_positions = torch.full((len(lengths), slots), -1)
    for b, n in enumerate(lengths):
        key_positions[b, held(n, slots, left)] = torch.arange(n)
    query_positions = torch.tensor(lengths)[:, None] - T + torch.arange(T)
    return k, v, key_positions, query_positions


@needs_attention_kernel
@pytest.mark.parametrize("heads, kv_heads, D", [(4, 1, 256), (14, 2, 64), (6, 6, 96)])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("window", [None, 7])
def test_the_attention_kernel_is_attention(heads, kv_heads, D, T, window):
    """The kernel's output is float64 attention over the same bfloat16 inputs, masked as
    `attention_mask` says (left padding, a sliding window, causal among T queries), rounded once to
    bfloat16 (2^-9 of each value, float32 scores and sums add far less)."""
    from kvgen.models.layers import attention_mask

    k, v, key_positions, query_positions = padded_rows([5, 37, 12], 40, True, kv_heads, D, T)
    q = torch.randn(3, heads, T, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    mask = attention_mask(query_positions, key_positions, window)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=D**-0.5, enable_gqa=True
    )
    got = torch.ops.kvgen.attention(q, k, v, mask, D**-0.5).double()
    assert got.shape == want.shape
    assert ((got - want).abs() <= 2**-8 * want.abs() + 1e-4).all()


@needs_attention_kernel
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("T", [1, 2])
def test_a_rows_attention_does_not_depend_on_its_batch_or_its_empty_slots(left, T):
    """Each row of a batch attends bit for bit as it does alone over only its own slots, whether the
    batch's empty slots lie in front of it (left padding) or behind (a static cache's tail)."""
    from kvgen.models.layers import attention, attention_mask

    lengths, slots = [5, 37, 12, 40], 40
    k, v, key_positions, query_positions = padded_rows(lengths, slots, left, 2, 64, T)
    q = torch.randn(4, 8, T, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    together = attention(q, k, v, attention_mask(query_positions, key_positions), 0.125, kernel=True)
    for b, n in enumerate(lengths):
        own = held(n, slots, left)
        mask = attention_mask(query_positions[b : b + 1], key_positions[b : b + 1, own])
        alone = torch.ops.kvgen.attention(q[b : b + 1], k[b : b + 1, :, own], v[b : b + 1, :, own], mask, 0.125)
        assert torch.equal(together[b : b + 1], alone), b
    assert not torch.equal(together[0], together[1])  # rows that differ: the comparison means something
