"""The decode fast path (`kvgen.fast`): fused projections and prepacked weights change nothing a
user sees. The reference is the same checkpoint loaded with `quantize="none"` (plain `nn.Linear`s,
which test_llama_qwen, test_gemma3 and test_gpt2 hold against transformers)."""

import json
import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kvgen
from kvgen.fast import FastLinear, FusedLinear, packing_available, speed_up
from kvgen.generate import generate_tokens
from kvgen.loading import populate_file_pages, release_file_pages
from kvgen.loading.dtype import packing_pays
from kvgen.models import family
from kvgen.testing import build_gemma3, build_gpt2, build_llama, build_qwen2, build_qwen3

BUILDERS = {
    "gpt2": (build_gpt2, {}),
    "llama-gqa-bias": (build_llama, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "qwen2-tied": (build_qwen2, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (build_qwen3, dict(num_key_value_heads=2)),
    "gemma3-sliding": (build_gemma3, dict(num_key_value_heads=1, sliding_window=6)),
}
PROMPTS = ["the cat sat on the mat", "It was the best of times", "a"]  # batched: left padding
N = 24


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory):
    build, config = BUILDERS[request.param]
    return build(tmp_path_factory.mktemp(request.param), **config)


def greedy(lm, cache: str) -> list[list[int]]:
    prompts = [lm.encode(p) for p in PROMPTS]
    steps = list(generate_tokens(lm.model, prompts, N, cache_kind=cache))
    return torch.stack(steps, dim=1).tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "fused"])
def test_same_greedy_tokens_as_the_reference_path(folder, dtype, pack):
    reference = kvgen.load(folder, dtype=dtype, quantize="none")
    fast = kvgen.load(folder, dtype=dtype, quantize="none")
    speed_up(fast.model, pack_weights=pack)
    assert isinstance(fast.model.lm_head, FastLinear) == (pack and packing_available())
    for cache in ("dynamic", "static"):
        want = greedy(reference, cache)
        assert greedy(fast, cache) == want, cache
        assert len({tuple(row) for row in want}) > 1 and all(len(set(row)) > 2 for row in want)  # not degenerate


def test_logits_match_and_checkpoint_is_untouched(folder):
    reference = kvgen.load(folder, dtype="float32", quantize="none").model
    model = kvgen.load(folder, dtype="float32", quantize="none").model
    before = {name: t.clone() for name, t in model.state_dict().items()}
    speed_up(model, pack_weights=True)
    after = model.state_dict()
    assert after.keys() == before.keys()  # the fast path's tensors are never saved
    assert all(torch.equal(after[name], t) for name, t in before.items())
    tokens = torch.arange(3, 40).reshape(1, -1) % 300
    positions = torch.arange(tokens.shape[1])[None]
    want = reference(tokens, positions, all_logits=True)
    torch.testing.assert_close(model(tokens, positions, all_logits=True), want, rtol=0, atol=1e-4)


def test_load_builds_the_fast_path_by_default(folder):
    lm = kvgen.load(folder, dtype="float32")
    kinds = {type(m) for m in lm.model.modules()}
    assert (FusedLinear in kinds) == ("gpt2" not in str(folder))  # GPT-2's checkpoint already fuses q, k, v
    packed = [m for m in lm.model.modules() if isinstance(m, FastLinear)]
    assert bool(packed) == packing_pays(torch.float32)
    kinds = {type(m) for m in kvgen.load(folder, dtype="float32", quantize="none").model.modules()}
    assert not kinds & {FusedLinear, FastLinear}


def test_large_weights_are_packed_in_blocks(monkeypatch):
    """A weight over PACK_CHUNK_BYTES (an LM head) is packed block by block; the product and its
    bias are the same."""
    import kvgen.fast

    monkeypatch.setattr(kvgen.fast, "PACK_CHUNK_BYTES", 40 * 16 * 4)  # 40 rows of 16 floats
    linear = torch.nn.Linear(16, 100)
    packed = FastLinear(linear)
    assert packed.blocks == 3
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(packed(x), linear(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"], ids=["mapped", "converted"])
def test_released_pages_still_read_the_same_values(folder, dtype):
    """Handing weights' pages back to the OS loses nothing: mapped ones are read again from the
    file, and anonymous ones (converted at load from the float32 checkpoint) can only be swapped."""
    (file,) = folder.glob("*.safetensors")
    lm = kvgen.load(folder, dtype=dtype, quantize="none")
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    on_disk = family(model_type)[1].remap(load_file(file))  # the checkpoint, in the model's names
    populate_file_pages(list(lm.model.parameters()))
    release_file_pages(list(lm.model.parameters()))
    state = lm.model.state_dict()
    assert state.keys() == on_disk.keys()
    for name, t in on_disk.items():
        assert torch.equal(state[name], t.to(state[name].dtype)), name


def _smaps(address: int, field: str) -> list[str]:
    """A field of the kernel's record of the mapping holding `address` (Linux's /proc/self/smaps)."""
    mapping = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(part, 16) for part in head.split("-"))
            mapping = start <= address < end
        elif mapping and head == field:
            return line.split()[1:]
    raise LookupError(f"no mapping holds {address:#x}")


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(), reason="no transparent huge pages here"
)
@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN prepacked linear")
def test_packed_weights_are_advised_into_huge_pages():
    """Every decode step streams the packed weights whole: their pages are marked for 2 MB pages
    (`hg`), which the kernel's khugepaged then merges (kvgen.loading.advise_huge_pages)."""
    linear = torch.nn.Linear(1024, 4096, bias=False)  # 16 MB in float32
    packed = FastLinear(linear).packed0
    middle = torch.ops.mkldnn.data_ptr(packed) + torch.ops.mkldnn._nbytes(packed) // 2
    assert "hg" in _smaps(middle, "VmFlags:")
    fused = FusedLinear([torch.nn.Linear(1024, 2048), torch.nn.Linear(1024, 2048)], packed=True).packed
    assert "hg" in _smaps(torch.ops.mkldnn.data_ptr(fused) + torch.ops.mkldnn._nbytes(fused) // 2, "VmFlags:")
    # Not a packed weight: not advised. (Its own mapping: the heap may reuse a freed packed weight's advised pages.)
    plain = torch.frombuffer(mmap.mmap(-1, 16 << 20), dtype=torch.float32)
    assert "hg" not in _smaps(plain.data_ptr() + plain.nbytes // 2, "VmFlags:")
