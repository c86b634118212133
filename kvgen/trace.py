"""See generation happen: per-step records of shapes and caches, tables, JSON and plots.

A `Tracer` is an observer for the generation loop (`generate_tokens(..., observe=tracer)`, or
`LM.generate(..., trace=True)`): after every step it snapshots what was fed, what was computed and
what each layer's cache holds into plain dataclass records. The loop does not know it is being
watched, and without an observer it keeps no records at all.

What attention saw this step (the `S` of the (B, 1, T, S) mask) depends on the cache kind:
a dynamic cache hands attention everything it holds, a static one its whole preallocated buffer,
a ring buffer its `window` slots (plus the new entries during a multi-token prefill), and a
windowed dynamic cache what it kept from before plus the new entries (it then keeps `window - 1`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .cache import DynamicLayerCache, LayerCache, LayerShape, RingLayerCache, SinkLayerCache, StaticLayerCache
from .generate import Step
from .models import layers as _layers


@dataclass
class Candidate:
    """A token the model could pick: its id, its text and its probability (softmax of the raw logits)."""

    id: int
    text: str
    prob: float


@dataclass
class LayerCacheRecord:
    """One layer's KV cache after a step."""

    layer: int
    kind: str  # "dynamic", "static", "ring" (the static cache of a sliding-window layer) or "sink"
    window: int | None  # sliding-window layers: the tokens a query may see
    keys: tuple[int, ...]  # (B, Hkv, S_stored, D); () before anything is stored
    values: tuple[int, ...]
    length: int  # tokens stored (the filled part of a preallocated cache)
    allocated: int | None  # slots preallocated (static, ring); None for dynamic
    index: int | None  # the slot the next token is written to (static, ring); None for dynamic
    mask: tuple[int, ...]  # (B, 1, T, S): S is how many slots attention saw this step
    nbytes: int


@dataclass
class StepRecord:
    """One step of the loop: step 0 is the prefill, every later one a decode step."""

    index: int
    phase: str  # "prefill" or "decode"
    input_ids: tuple[int, ...]  # shape of the (B, T) token ids fed
    positions: list[list[int]]  # (B, T) positions fed, -1 = padding
    logits: tuple[int, ...]  # shape of the logits as computed: (B, vocab), the last position only
    chosen: list[Candidate]  # one per row
    top: list[list[Candidate]]  # per row, the most probable tokens, best first
    layers: list[LayerCacheRecord]
    cache_bytes: int
    seconds: float  # forward + sampling
    attention: list[float] | None = None  # probed layer/head: weight on the key at each position 0, 1, ...


def _tensor_shape(t: Tensor | None) -> tuple[int, ...]:
    return tuple(t.shape) if t is not None else ()


def _kind(cache: LayerCache) -> str:
    if isinstance(cache, DynamicLayerCache):
        return "dynamic"
    if isinstance(cache, StaticLayerCache):
        return "static"
    if isinstance(cache, RingLayerCache):
        return "ring"
    if isinstance(cache, SinkLayerCache):
        return "sink"
    raise TypeError(f"unknown cache type {type(cache).__name__}")


class AttentionProbe:
    """Keeps the attention weights of one layer and head, for the last query of each forward.

    Installed as `kvgen.models.layers.attention_probe` by `probing`; attention calls it once per
    layer in order, so the number of calls since the last step is the layer's index.
    """

    def __init__(self, layer: int, head: int) -> None:
        self.layer, self.head = layer, head
        self.calls = 0
        self.weights: Tensor | None = None  # (S,) for the last forward

    def __call__(self, q: Tensor, k: Tensor, mask: Tensor, scale: float) -> None:
        if self.calls == self.layer:
            heads = q.shape[1]
            if not 0 <= self.head < heads:
                raise ValueError(
                    f"head {self.head} is out of range: layer {self.layer} has {heads} heads (0-{heads - 1})"
                )
            kv = self.head // (heads // k.shape[1])
            q1, k1 = q[:1, self.head : self.head + 1, -1:], k[:1, kv : kv + 1]  # row 0, last query
            self.weights = _layers.attention_weights(q1, k1, mask[:1, :, -1:], scale)[0, 0, 0]  # (S,)
        self.calls += 1


@contextlib.contextmanager
def probing(probe: AttentionProbe | None) -> Iterator[None]:
    """Install `probe` on every attention call while the block runs (nothing when None)."""
    _layers.attention_probe = probe
    try:
        yield
    finally:
        _layers.attention_probe = None


class Tracer:
    """An observer that turns each `generate.Step` into a `StepRecord`, appended to `.records`.

    Give it the tokenizer to get token texts and the model's `cache_layout()` to name each layer's
    sliding window (a ring buffer shorter than the window cannot tell); with `attention=(layer,
    head)` it also records that head's attention weights, if generation runs inside
    `probing(tracer.probe)`. It assumes a fresh cache (the first step it sees is the prefill).
    """

    def __init__(
        self,
        tokenizer=None,
        top_k: int = 5,
        attention: tuple[int, int] | None = None,
        layout: list[LayerShape] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        self.top_k = top_k
        self.records: list[StepRecord] = []
        self.probe = AttentionProbe(*attention) if attention is not None else None
        self._stored: dict[int, int] = {}  # layer -> tokens held after the previous step
        self._probe_positions: Tensor | None = None  # the probed layer's slot positions after the previous step

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def __call__(self, step: Step) -> None:
        B, T = step.tokens.shape
        probs = step.logits.float().softmax(dim=-1)  # (B, vocab)
        top_p, top_i = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        chosen = [Candidate(t, self._text(t), probs[b, t].item()) for b, t in enumerate(step.token.tolist())]
        top = [
            [Candidate(i, self._text(i), p) for i, p in zip(ids, ps)] for ids, ps in zip(top_i.tolist(), top_p.tolist())
        ]
        layers = [self._layer(i, cache, B, T) for i, cache in enumerate(step.cache)]
        self.records.append(
            StepRecord(
                index=step.index,
                phase="prefill" if step.index == 0 else "decode",
                input_ids=tuple(step.tokens.shape),
                positions=step.positions.tolist(),
                logits=tuple(step.logits.shape),
                chosen=chosen,
                top=top,
                layers=layers,
                cache_bytes=sum(layer.nbytes for layer in layers),
                seconds=step.seconds,
                attention=self._attention(step) if self.probe is not None else None,
            )
        )

    def _layer(self, i: int, cache: LayerCache, B: int, T: int) -> LayerCacheRecord:
        kind = _kind(cache)
        allocated = index = None
        window = self.layout[i].window if self.layout is not None else getattr(cache, "window", None)
        if kind == "sink":  # attention saw the filled part: sinks + window once full
            allocated, index, seen = cache.keys.shape[2], cache.index, cache.length
        elif kind == "dynamic":
            # A windowed one handed attention what it kept plus the new entries, then dropped some.
            seen = self._stored.get(i, 0) + T if window is not None else cache.length
        else:
            allocated = cache.keys.shape[2]
            index = cache.index % allocated if kind == "ring" else cache.index
            seen = allocated if kind == "static" or T == 1 else allocated + T
            if kind == "ring" and self.layout is None:
                window = allocated
        self._stored[i] = cache.length
        return LayerCacheRecord(
            i,
            kind,
            window,
            _tensor_shape(cache.keys),
            _tensor_shape(cache.values),
            cache.length,
            allocated,
            index,
            (B, 1, T, seen),
            cache.nbytes,
        )

    def _attention(self, step: Step) -> list[float]:
        """The probed head's weights for the last query, laid out by key position."""
        probe, cache = self.probe, step.cache[self.probe.layer]
        weights = probe.weights
        probe.calls, probe.weights = 0, None
        if cache.positions.shape[1] == weights.shape[0]:  # attention saw exactly the slots now stored
            positions = cache.positions[0]
        else:  # it saw the slots from before plus the new entries (prefill into a ring, a windowed cache)
            T = step.positions.shape[1]
            before = self._probe_positions
            if before is None:
                before = torch.full((weights.shape[0] - T,), -1, dtype=torch.long, device=weights.device)
            positions = torch.cat([before, step.positions[0]])
        self._probe_positions = cache.positions[0].clone()
        row = torch.zeros(int(positions.max()) + 1)
        seen = positions >= 0
        row.index_add_(0, positions[seen].cpu(), weights[seen].cpu())
        return row.tolist()


# ---------------------------------------------------------------- table


def _span(positions: list[int]) -> str:
    real = [p for p in positions if p >= 0]
    if len(real) > 3 and real == list(range(real[0], real[-1] + 1)):
        text = f"{real[0]}..{real[-1]}"
    else:
        text = ", ".join(map(str, real))
    pad = len(positions) - len(real)
    return f"[{text}]" + (f" +{pad} pad" if pad else "")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 4] -> "0-2,4"."""
    parts, start = [], None
    for n, i in enumerate(indices):
        if start is None:
            start = i
        if n + 1 == len(indices) or indices[n + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")" if shape else "empty"


def layer_groups(record: StepRecord) -> list[tuple[list[int], LayerCacheRecord]]:
    """Layers whose caches look the same this step, grouped: (layer indices, one of their records)."""
    groups: dict[tuple, tuple[list[int], LayerCacheRecord]] = {}
    for layer in record.layers:
        key = (
            layer.kind,
            layer.window,
            layer.keys,
            layer.values,
            layer.length,
            layer.allocated,
            layer.index,
            layer.mask,
        )
        groups.setdefault(key, ([], layer))[0].append(layer.layer)
    return list(groups.values())


def _kv(layer: LayerCacheRecord) -> str:
    if layer.keys == layer.values:
        return f"K,V {_shape(layer.keys)}"
    return f"K {_shape(layer.keys)} V {_shape(layer.values)}"


def describe_cache(layer: LayerCacheRecord) -> str:
    """One layer's cache in one line: K/V shapes, and for a preallocated one how much is filled."""
    kv = _kv(layer)
    if layer.allocated is not None:
        what = f"ring of {layer.allocated}" if layer.kind == "ring" else "allocated"
        kv += f" {what}, filled {layer.length}, write @ {layer.index}"
    if layer.window is not None:
        kv += f" (window {layer.window})"
    return kv


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cache_lines(layers: list[int], layer: LayerCacheRecord) -> list[str]:
    """A group of alike layers' caches as short lines: a narrow column wraps nothing mid-phrase."""
    window = f", window {layer.window}" if layer.window is not None else ""
    lines = [f"L{_ranges(layers)}{window}", f" mask {_shape(layer.mask)}", f" {_kv(layer)}"]
    if layer.allocated is not None:
        what = f"ring of {layer.allocated}" if layer.kind == "ring" else f"allocated {layer.allocated}"
        lines += [f" {what}", f" filled {layer.length}, write @ {layer.index}"]
    return lines


def print_table(records: list[StepRecord], title: str = "", console=None) -> None:
    """The records as a rich table, one row per step, narrow enough for an 80-column terminal: the
    step's shapes, the chosen token and the top 5, and each group of alike layers' mask and cache.
    `kvgen trace --json` prints every field in full."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(highlight=False)
    # Text, not markup: a token or prompt such as "[/b]" is shown as it is.
    table = Table(title=Text(title) if title else None, box=box.SIMPLE_HEAD, show_lines=True, title_justify="left")
    for name in ("step", "ids fed → logits", "chosen (p), top 5", "KV cache: mask, K/V"):
        table.add_column(name, overflow="fold")
    for r in records:
        fed = [f"{_shape(r.input_ids)} at", *map(_span, r.positions), f"→ {_shape(r.logits)}"]
        picks = [f"{c.id} {c.text!r} {c.prob:.3f}" for c in r.chosen]
        picks += [f"  {c.text!r} {c.prob:.2f}" for row in r.top for c in row]
        layers = [line for idx, rec in layer_groups(r) for line in _cache_lines(idx, rec)]
        step = [str(r.index), r.phase, f"{r.seconds * 1e3:.1f} ms", _bytes(r.cache_bytes)]
        table.add_row(*(Text("\n".join(cell)) for cell in (step, fed, picks, layers)))
    console.print(table)


# ---------------------------------------------------------------- JSON


def check_output(path: str | None, suffix: str | None = None) -> None:
    """Refuse an output path before any model is loaded: its folder must exist."""
    if path is None:
        return
    if suffix and not path.lower().endswith(suffix):
        raise ValueError(f"{path}: the plot is a PNG image; name the file *{suffix}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"{path}: folder {str(folder)!r} does not exist")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def emit_json(doc: dict, stdout: bool, path: str | Path | None, indent: int = 2) -> None:
    """A command's JSON document: printed on stdout (`--json`) and/or written to `path` (`-o FILE`)."""
    text = json.dumps(doc, indent=indent)
    if path:
        write_atomic(path, text.encode())
    if stdout:
        print(text)


def trace_document(records: list[StepRecord], model: str, cache: str, prompt: str, text: str) -> dict:
    """What `kvgen trace --json` prints: the run, its generated text and every step's full record."""
    return {"model": model, "cache": cache, "prompt": prompt, "text": text, "steps": [asdict(r) for r in records]}


# ---------------------------------------------------------------- plots


def _group_label(layer: LayerCacheRecord) -> str:
    return "global layers" if layer.window is None else f"sliding layers (window {layer.window})"


def trace_figure(records: list[StepRecord], title: str = ""):
    """Cache length per layer kind, cache bytes and step time, per step; prefill and decode told apart."""
    from matplotlib.figure import Figure

    steps = [r.index for r in records]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    length_ax, bytes_ax, time_ax = fig.subplots(1, 3)
    groups: dict[str, int] = {}  # label -> first layer with it
    for layer in records[0].layers:
        groups.setdefault(_group_label(layer), layer.layer)
    for n, (label, first) in enumerate(groups.items()):
        length_ax.plot(
            steps, [r.layers[first].length for r in records], marker="o", ms=3, color=f"C{n}", label=f"{label}: stored"
        )
        allocated = [r.layers[first].allocated for r in records]
        if allocated[0] is not None:
            length_ax.plot(steps, allocated, ls="--", color=f"C{n}", label=f"{label}: allocated")
    length_ax.set(title="cache length", xlabel="step (0 = prefill)", ylabel="tokens")
    length_ax.legend(fontsize=7)
    bytes_ax.plot(steps, [r.cache_bytes / 1024 for r in records], marker="o", ms=3, color="C2", label="all layers")
    bytes_ax.set(title="cache bytes", xlabel="step (0 = prefill)", ylabel="KiB")
    bytes_ax.set_ylim(bottom=0)
    bytes_ax.legend(fontsize=7)
    times = [r.seconds * 1e3 for r in records]
    time_ax.bar(steps[:1], times[:1], color="C3", label="prefill")
    time_ax.bar(steps[1:], times[1:], color="C0", label="decode")
    time_ax.set(title="step time", xlabel="step (0 = prefill)", ylabel="ms")
    time_ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def compare_figure(runs: dict[str, list[StepRecord]], title: str = ""):
    """Cache bytes and step time per step, one series per cache kind, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    bytes_ax, time_ax = fig.subplots(1, 2)
    width = 0.8 / len(runs)
    for n, (kind, records) in enumerate(runs.items()):
        steps = [r.index for r in records]
        bytes_ax.plot(
            steps, [r.cache_bytes / 1024 for r in records], marker="o", ms=3, color=f"C{n}", label=f"{kind} cache"
        )
        offsets = [s + (n - (len(runs) - 1) / 2) * width for s in steps]
        time_ax.bar(offsets, [r.seconds * 1e3 for r in records], width=width, color=f"C{n}", label=f"{kind} cache")
    bytes_ax.set(title="cache bytes", xlabel="step (0 = prefill)", ylabel="KiB")
    bytes_ax.set_ylim(bottom=0)
    time_ax.set(title="step time (step 0 = prefill)", xlabel="step", ylabel="ms")
    for ax in (bytes_ax, time_ax):
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def attention_figure(records: list[StepRecord], layer: int, head: int, title: str = ""):
    """The probed head's weights: rows = steps (0 = prefill's last query), columns = key positions."""
    from matplotlib.figure import Figure

    rows = [r.attention for r in records]
    width = max(len(row) for row in rows)
    grid = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        grid[i, : len(row)] = torch.tensor(row)
    fig = Figure(figsize=(7, 1.5 + 0.25 * len(rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="weight")
    ax.set(
        title=title or f"attention weights, layer {layer} head {head}",
        xlabel="key position (cached)",
        ylabel="step (0 = prefill's last query)",
    )
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Render a figure to PNG at `path`, atomically."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
