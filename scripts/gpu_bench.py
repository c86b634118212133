"""Decode speed on a GPU: kvgen (eager; static cache + CUDA graph) against transformers (eager;
static cache + torch.compile "reduce-overhead"), on random weights of three real shapes.

    python scripts/gpu_bench.py                 # on a CUDA machine: GPT-2 124M, Gemma 3 270M, Llama 1B shapes
    python scripts/gpu_bench.py --tiny --device cpu   # a smoke run of the script itself

Each system decodes greedily from the same 128-token prompt, from the same safetensors files, in
bfloat16 at batch 1, after one warm-up over the full length (the first pass over new lengths builds
attention plans and compiled graphs). Decode tok/s = (new tokens - 1) / (time of the last token -
time of the first), the method of ../shared/ANCHORS.md. Greedy tokens are compared across systems.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SHAPES = {  # transformers config class, its arguments
    "GPT-2 124M": ("GPT2Config", dict(n_positions=1024)),
    "Gemma 3 270M": (
        "Gemma3TextConfig",
        dict(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            max_position_embeddings=32768,
        ),
    ),
    "Llama 1B": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    n_embd=64,
    n_layer=2,
    n_head=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=512,
    sliding_window=16,
)


def build(shape: str, folder: Path, tiny: bool) -> None:
    import transformers

    name, kwargs = SHAPES[shape]
    config_cls = getattr(transformers, name)
    kwargs = {**kwargs, **({k: v for k, v in TINY.items() if hasattr(config_cls(), k)} if tiny else {})}
    model_cls = {
        "GPT2Config": "GPT2LMHeadModel",
        "Gemma3TextConfig": "Gemma3ForCausalLM",
        "LlamaConfig": "LlamaForCausalLM",
    }
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = getattr(transformers, model_cls[name])(config_cls(**kwargs)).to(torch.bfloat16)
    model.save_pretrained(folder)


def timed(run, device: str) -> tuple[list[int], float]:
    """run(on_token) -> tokens; returns the tokens and decode tok/s from per-token timestamps."""
    stamps: list[float] = []

    def on_token() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    tokens = run(on_token)
    return tokens, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def kvgen_runner(folder: Path, device: str, cache_kind: str):
    from kvgen.generate import generate_tokens
    from kvgen.loading import load_native
    from kvgen.runner import prepare

    model = load_native(folder, torch.bfloat16, device)
    runner = prepare(model, folder, None, torch.bfloat16, device, "auto")  # as kvgen.load does: CUDA graphs on a GPU

    def run(ids: list[int], n: int, on_token) -> list[int]:
        out = []
        for step in generate_tokens(model, [ids], n, cache_kind=cache_kind, decoder=runner.decoder):
            out.append(int(step[0]))
            on_token()
        return out

    return run


def hf_runner(folder: Path, device: str, compiled: bool):
    from transformers import AutoModelForCausalLM, CompileConfig
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    options = {}
    if compiled:
        # transformers' own way: with a static cache, generate compiles the decode step (inductor,
        # "reduce-overhead": CUDA graphs) and runs the prefill uncompiled. Compiling `model.forward`
        # by hand instead fails: the graph's outputs are overwritten by the next replay.
        config = CompileConfig()
        config._compile_all_devices = device != "cuda"  # so that a CPU smoke run compiles too
        options = dict(cache_implementation="static", compile_config=config)

    def run(ids: list[int], n: int, on_token) -> list[int]:
        class Stamps(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if self.prompt_seen:
                    on_token()
                self.prompt_seen = True

            def end(self):
                pass

        prompt = torch.tensor([ids], device=device)
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Stamps(), **options)
        if compiled and not hasattr(model, "_compiled_call"):
            raise RuntimeError("transformers ran its decode step uncompiled")
        return out[0, len(ids) :].tolist()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same families (a smoke run)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="only these shapes (repeatable)")
    args = parser.parse_args()
    systems = {
        "kvgen eager (dynamic cache)": lambda f: kvgen_runner(f, args.device, "dynamic"),
        "kvgen static cache + CUDA graph": lambda f: kvgen_runner(f, args.device, "static"),
        "transformers eager": lambda f: hf_runner(f, args.device, compiled=False),
        "transformers static + compile": lambda f: hf_runner(f, args.device, compiled=True),
    }
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"| shape | {' | '.join(systems)} |   ({device_name}, bfloat16, batch 1, decode tok/s)")
    print("|---" * (len(systems) + 1) + "|")
    for shape in args.shape or SHAPES:
        with tempfile.TemporaryDirectory() as tmp:
            build(shape, Path(tmp), args.tiny)
            ids = torch.randint(0, 500, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
            figures, streams = [], {}
            for system, make in systems.items():
                try:
                    run = make(Path(tmp))
                    warm = time.perf_counter()
                    timed(lambda on_token: run(ids, args.new_tokens, on_token), args.device)  # warm-up
                    warm = time.perf_counter() - warm
                    tokens, rate = timed(lambda on_token: run(ids, args.new_tokens, on_token), args.device)
                except Exception:  # one system's failure must not cost the device time spent on the others
                    traceback.print_exc()
                    figures.append(f"failed (see {system!r} above)")
                    continue
                figures.append(f"{rate:.0f} (warm-up {warm:.0f} s)")
                print(f"{shape}, {system}: {figures[-1]}", file=sys.stderr, flush=True)
                streams[system] = tokens
            print(f"| {shape} | {' | '.join(figures)} |   {agreement(streams)}", flush=True)


def agreement(streams: dict[str, list[int]]) -> str:
    """Which systems gave the same greedy tokens, and where each other group parts from the first."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for system, tokens in streams.items():
        groups.setdefault(tuple(tokens), []).append(system)
    if len(groups) == 1:
        return "same greedy tokens"
    (reference, _), *others = groups.items()
    parts = [" = ".join(names) for names in groups.values()]
    at = [next(i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b) for tokens, _ in others]
    return f"tokens agree within [{'], ['.join(parts)}]; later groups part from the first at token {at}"


if __name__ == "__main__":
    main()
