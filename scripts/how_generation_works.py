"""Write docs/how-generation-works.md (and its plots) from real traces of a model.

    python scripts/how_generation_works.py [--model M] [--out docs/] [-n 6] [--prompt TEXT]

Every shape, token and byte count in the page comes from `kvgen.trace` records of this run, with
a dynamic and a static cache; only the timings change from one run to the next. The default model
is the embedded Gemma 3 270M, in float32 so that the tokens do not depend on the machine's dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kvgen
from kvgen.trace import (
    StepRecord,
    Tracer,
    attention_figure,
    compare_figure,
    describe_cache,
    layer_groups,
    probing,
    save_figure,
    trace_figure,
    write_atomic,
)


def _shape(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _token(text: str) -> str:
    """A token's text for a Markdown table cell: quoted, with the column bar escaped."""
    return "`" + repr(text).replace("|", "\\|") + "`"


def _layers(indices: list[int]) -> str:
    return f"{indices[0]}" if len(indices) == 1 else ", ".join(map(str, indices))


def shapes_table(records: list[StepRecord]) -> str:
    """One row per step and group of alike layers: what went in, what came out, what the cache holds."""
    lines = [
        "| step | phase | input ids | positions | logits | chosen token (p) | layers | mask | K and V cache | cache bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        positions = r.positions[0]
        pos = f"{positions[0]}..{positions[-1]}" if len(positions) > 1 else str(positions[0])
        chosen = r.chosen[0]
        first = True
        for indices, layer in layer_groups(r):
            head = (
                f"| {r.index} | {r.phase} | {_shape(r.input_ids)} | {pos} | {_shape(r.logits)} | "
                f"{chosen.id} {_token(chosen.text)} ({chosen.prob:.3f}) "
                if first
                else "| | | | | | "
            )
            lines.append(
                f"{head}| {_layers(indices)} | {_shape(layer.mask)} | {describe_cache(layer)} | "
                + (f"{r.cache_bytes:,} |" if first else " |")
            )
            first = False
    return "\n".join(lines)


def top_table(records: list[StepRecord]) -> str:
    lines = ["| step | top-5 next tokens (probability) |", "|---|---|"]
    for r in records:
        lines.append(f"| {r.index} | " + ", ".join(f"{_token(c.text)} {c.prob:.3f}" for c in r.top[0]) + " |")
    return "\n".join(lines)


def trace(lm: kvgen.LM, prompt: str, n: int, cache: str, attention: tuple[int, int] | None = None) -> list[StepRecord]:
    tracer = Tracer(lm.tokenizer, attention=attention, layout=lm.model.cache_layout())
    with probing(tracer.probe):
        lm.generate_batch([prompt], n, observe=tracer, cache=cache, stop_at_eos=False)
    return tracer.records


def write_page(lm: kvgen.LM, model_name: str, prompt: str, n: int, out: Path) -> Path:
    lm.generate(prompt, 2)  # warm-up: the first forward pays one-time set-up, which would skew the timings
    dynamic = trace(lm, prompt, n, "dynamic")
    static = trace(lm, prompt, n, "static")
    if [r.chosen[0].id for r in dynamic] != [r.chosen[0].id for r in static]:
        raise SystemExit("the dynamic and static caches chose different tokens; not writing the page")
    layout = lm.model.cache_layout()
    global_layer = next((i for i, shape in enumerate(layout) if shape.window is None), 0)
    attention = trace(lm, prompt, n, "dynamic", attention=(global_layer, 0))

    save_figure(trace_figure(dynamic, f"dynamic cache: {prompt!r}"), out / "trace-dynamic.png")
    save_figure(trace_figure(static, f"static cache: {prompt!r}"), out / "trace-static.png")
    save_figure(
        compare_figure({"dynamic": dynamic, "static": static}, f"{prompt!r} + {n} tokens"), out / "compare-caches.png"
    )
    save_figure(attention_figure(attention, global_layer, 0), out / "attention.png")

    prompt_ids = lm.encode(prompt)
    T, vocab = len(prompt_ids), dynamic[0].logits[1]
    text = lm.tokenizer.decode([r.chosen[0].id for r in dynamic])
    first = dynamic[0].layers[global_layer]
    kv_heads, head_dim = first.keys[1], first.keys[3]
    windows = sorted({shape.window for shape in layout if shape.window is not None})
    decode_ms = sum(r.seconds for r in dynamic[1:]) / max(len(dynamic) - 1, 1) * 1e3
    sliding = (
        f"{sum(s.window is not None for s in layout)} of its {len(layout)} layers are sliding-window layers "
        f"(window {', '.join(map(str, windows))}) and the rest are global. "
        if windows
        else f"All {len(layout)} of its layers are global (no sliding window). "
    )
    short = (
        f" Here prompt + new tokens ({T + n}) fit in the window, so the sliding layers' caches hold as much as"
        " the global ones; only a longer stream would show them stop growing."
        if windows and T + n <= min(windows)
        else ""
    )
    page = f"""# How generation works

*Generated by `scripts/how_generation_works.py` from real traces of **{model_name}**
({lm.dtype}, {len(layout)} layers, key/value heads: {kv_heads} of {head_dim} dimensions, a vocabulary of
{vocab:,} tokens). Every shape, token and byte count below comes from that run; rerun the script to
regenerate this page (on the same machine the shapes and tokens come out the same; the timings
differ from run to run).* Run it yourself with `kvgen trace`:

```sh
kvgen trace {prompt!r} -n {n} --cache dynamic --plot trace.png -o trace.json
kvgen trace {prompt!r} -n {n} --cache static
kvgen compare {prompt!r} -n {n} --caches dynamic,static --plot compare.png
kvgen trace {prompt!r} -n {n} --attention {global_layer},0 --plot attention.png
```

The prompt is {prompt!r}: {T} tokens `{prompt_ids}`. Greedy decoding continues it with
{n} tokens: {text!r}.

## Two ways to generate

A causal language model maps a sequence of token ids to a distribution over the next token.
Generating text means asking it again and again, each time with one more token.

- **Way 1** is transformers' `model.generate()`: the reference (`kvgen.load(..., backend="hf")`).
- **Way 2** is kvgen's own loop (the default): a **prefill** step runs the whole prompt through
  the model once, fills a **KV cache** with every layer's keys and values and picks the first
  token; then each **decode** step feeds just that one new token, with its position, and the
  cache. `kvgen compare` runs both on the same weights and checks that they choose identical tokens.

Without a cache every step would recompute the keys and values of the whole sequence so far:
step *i* would cost as much as a prefill of *T + i* tokens. With one, a decode step computes
the keys and values of one token and attends over the cached rest.

## Prefill: the whole prompt at once

Step 0 feeds the prompt as one `(batch, T)` = `{_shape(dynamic[0].input_ids)}` tensor of token ids,
at positions 0..{T - 1}. Every layer computes queries, keys and values for all {T} positions;
the keys and values go into the cache, and each query attends to the keys at its own position
and before (the causal mask, `(batch, 1, T, S)`: here `{_shape(dynamic[0].layers[global_layer].mask)}` for a
global layer).

Only the **last** position's hidden state is turned into logits: `{_shape(dynamic[0].logits)}`, not
`(1, {T}, {vocab})`. The other positions' predictions would only say which token follows a token
we already have; what they contribute to the future is already in the cache. Skipping them saves
a `(T, hidden) x (hidden, vocab)` product, the largest matrix product of the step when the
vocabulary is large.

## Decode: one token per step, and a dynamic cache that grows

After the prefill, every step feeds `(1, 1)`: the token just chosen, at the next position. The
**dynamic** cache (like transformers' `past_key_values`) appends the new key and value to what it
holds, so what it hands attention grows by one along the sequence axis every step: `(batch,
kv_heads, T + i, head_dim)` at decode step *i*. (It writes them in place into buffers with room to
spare, grown by half when full, rather than concatenating: a copy of the whole cache per step
would cost more the longer the text.) {sliding}A sliding-window layer's dynamic cache keeps only the
last `window - 1` entries (the next query sees those and itself), so its shape stops growing.{short}

{shapes_table(dynamic)}

What the model would have picked instead, at each step (probabilities are the softmax of the raw
logits):

{top_table(dynamic)}

![cache length, cache bytes and step time per step, dynamic cache](trace-dynamic.png)

## A static cache keeps its shape: Flax's way

Flax (and JAX in general) compiles a function for fixed tensor shapes: a cache that grew by one
token per step would force a recompilation at every step. So Flax allocates the cache once, for
prompt + new tokens, and writes each step's keys and values **in place** at the current index with
`lax.dynamic_update_slice`; it never grows. kvgen's **static** cache does the same: allocated at
`(batch, kv_heads, T + N, head_dim)` = `{_shape(static[0].layers[global_layer].keys)}`, with a write index
that advances by one per step. Like Flax's, the index is a tensor, on the cache's device, so a decode
step reads no Python number that changes: on a GPU the step can be recorded once as a CUDA graph and
replayed (`kvgen/graphs.py`). A decode step always sees the whole buffer; the slots not yet
written hold position -1 and the mask hides them, which is why the mask's last dimension is the
allocated length at every decode step (the prefill, which needs no fixed shape, sees only the slots
it wrote). A sliding-window layer gets a **ring** of `window` slots instead, written at (tokens so
far) mod window.

{shapes_table(static)}

The tokens are identical to the dynamic cache's: same maths, different bookkeeping. The static
cache takes its full size from the start; the dynamic one grows towards it (it never stores the
keys and values of the last token, which no step attends to):

![cache bytes and step time, dynamic beside static](compare-caches.png)

![cache length, cache bytes and step time per step, static cache](trace-static.png)

On the machine that generated this page a decode step took {decode_ms:.1f} ms on average (dynamic
cache) and the prefill {dynamic[0].seconds * 1e3:.1f} ms.

## What a step attends to

Rows are steps (row 0 is the prefill's last query), columns are the cached positions; the colour
is how much weight head 0 of layer {global_layer} (a global layer) puts on each. Many heads put a
large share of weight on the first position whatever it holds, an **attention sink**: a place to
park attention that has nowhere better to go.

![attention weights over the steps](attention.png)
"""
    path = out / "how-generation-works.md"
    write_atomic(path, page.encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model folder, GGUF file or hub id (default: the embedded Gemma 3 270M)"
    )
    parser.add_argument("--out", default="docs", help="folder for the page and its PNGs (default: docs)")
    parser.add_argument("-n", type=int, default=6, help="new tokens per trace (default 6)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lm = kvgen.load(args.model, dtype=args.dtype)
    name = args.model or "Gemma 3 270M (the embedded default model)"
    print(write_page(lm, str(name), args.prompt, args.n, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
