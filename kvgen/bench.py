"""`kvgen bench`: kvgen beside its peers (transformers, llama.cpp) on the same model file.

Every system runs in its own subprocess (`python -m kvgen.bench --worker SPEC`), so its load time
and peak RSS are its own. The parent encodes the prompt once with kvgen's tokenizer and hands every
worker the same token ids, measures this machine's memory read bandwidth once, and collects the
workers' figures into a table, a JSON document and a plot.

The workers load one after another, then stay up and take turns: per batch size (ascending),
each runs one warm-up at the timed prompt length (excluded), then `repeats` rounds in which every
system runs once, greedy, exactly `new_tokens` tokens through EOS, in an order rotated each round.
A shared machine that slows down for a while then costs every system alike, rather than whichever
ran during that while. Every figure is the median of a system's runs:
    ttft_s         call to first token (prefill plus the first sampling)
    prefill_tok_s  batch x prompt tokens / ttft_s
    decode_tok_s   batch x (new tokens - 1) / (time of the last token - time of the first)
    GB/s           weight bytes one decode step reads x decode steps per second
    peak_rss_mb    the worker's peak resident set (VmHWM) after that batch size ran (it only grows:
                   hence ascending batch sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .loading.tokenizer import load_tokenizer
from .quant import QuantEmbedding, QuantLinear

SYSTEMS = ("kvgen", "hf", "llama.cpp")
PEERS = SYSTEMS[1:]
LABELS = {
    "kvgen": "kvgen",
    "kvgen-reference": "kvgen, float reference",
    "hf": "transformers",
    "llama.cpp": "llama.cpp (llama-cpp-python)",
}
RESULT_KEYS = ("system", "decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb", "bandwidth_pct")
LLAMA_CPP_HINT = "pip install 'kvgen[bench]' (installs llama-cpp-python; it compiles llama.cpp for several minutes)"

# The opening of A Tale of Two Cities (public domain), repeated until the prompt is long enough.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way - in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only.\n\n"
)


# ---- flags --------------------------------------------------------------------------------------


def parse_peers(text: str) -> list[str]:
    """`--against`: comma-separated peers (hf, llama.cpp), or `none` for kvgen alone."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in PEERS:
            raise argparse.ArgumentTypeError(f"unknown system {name!r}; choose from: {', '.join(PEERS)} (or none)")
    if not names:
        raise argparse.ArgumentTypeError("name a system to compare against, or none")
    return list(dict.fromkeys(names))


def parse_batches(text: str) -> list[int]:
    """`--batch`: comma-separated batch sizes, each at least 1; returned ascending."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 1,8, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be whole numbers of at least 1, got {text!r}")
    return sorted(set(sizes))


# ---- worker: one system in its own process ------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB.

    Linux's VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (it survives the
    fork and the exec), so every worker would report at least the parent's 1 GiB bandwidth probe.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux and BSDs


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step streams: every tensor once (a tied head shares its memory
    with the embedding and is read once, as the head; fused products are views of one copy), but
    only one row of an embedding table that serves just as a lookup. oneDNN's packed copies are
    counted as the weights they copy."""
    head = getattr(model, "lm_head", None)
    linear = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    looked_up, row_bytes, ranges = set(), 0, []  # tables read only a row at a time: one row each
    for m in model.modules():
        tensors = [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if not t.is_mkldnn]
        table = None
        if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() not in linear:
            table, rows = [m.weight], m.num_embeddings
        elif isinstance(m, QuantEmbedding) and m.table is not head:
            table, rows = list(m.table.buffers()), m.table.out_features
        if table is not None:
            looked_up |= {t.data_ptr() for t in table}
            row_bytes += sum(t.numel() * t.element_size() for t in table) // rows
        ranges += [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    total, end = 0, 0
    # The union of the ranges: views and ties count once.
    for start, stop in sorted((s, e) for s, e in ranges if s not in looked_up):
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total + row_bytes


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's size as stored in a GGUF file (quantised), by name."""
    from .loading.gguf import GGUFFile

    return {name: int(t.n_bytes) for name, t in GGUFFile(path).tensors.items()}


def gguf_bytes_per_token(sizes: dict[str, int]) -> int:
    """What one llama.cpp decode step reads of a GGUF's tensors: the token embedding counts only
    when no separate `output.weight` exists (then it is the tied LM head, read whole)."""
    lookups = {"position_embd.weight", *(["token_embd.weight"] if "output.weight" in sizes else [])}
    return sum(size for name, size in sizes.items() if name not in lookups)


# A system's generate: (prompt ids, batch, new tokens) -> (row 0's tokens, start time, per-token times).
Generate = Callable[[list[int], int, int], tuple[list[int], float, list[float]]]
# A loader returns (its Generate, weight bytes a decode step reads, what its weights are).


def load_kvgen(spec: dict) -> tuple[Generate, int, str]:
    """kvgen's own loop (`generate.generate_tokens`) on `kvgen.load`; the clock runs around the load."""
    import kvgen
    from kvgen.generate import generate_tokens

    quantize = "none" if spec["system"] == "kvgen-reference" else "auto"
    lm = kvgen.load(spec["model"], spec["dtype"], quantize=quantize)

    def generate(ids: list[int], batch: int, n: int) -> tuple[list[int], float, list[float]]:
        tokens, stamps = [], []
        start = time.perf_counter()
        for step in generate_tokens(lm.model, [ids] * batch, n, decoder=lm.runner.decoder):
            tokens.append(int(step[0]))
            stamps.append(time.perf_counter())
        return tokens, start, stamps

    quantized = {"gguf": "GGUF int4/int8", None: ""}.get(lm.runner.quantized, lm.runner.quantized)
    kernels = {m.kernel for m in lm.model.modules() if isinstance(m, QuantLinear) and m.kind == "int4"}
    if kernels == {"kvgen"}:
        quantized += ", kvgen's int4 kernel"
    if lm.runner.compiled == "compiled layers":
        quantized += ", compiled layers"
    weights = spec["dtype"] + (f", {quantized}" if quantized else "")
    return generate, weight_bytes_per_token(lm.model), weights


def load_hf(spec: dict) -> tuple[Generate, int, str]:
    """transformers' tokenizer, model and `generate()` on the same file: a GGUF through its own GGUF
    loader (`gguf_file=`), a folder directly; each step timed by a streamer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging

    # Silenced here, not for every worker: importing transformers would count in kvgen's peak RSS.
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    path = Path(spec["model_file"])
    folder, extra = (path.parent, dict(gguf_file=path.name)) if spec["gguf"] else (path, {})
    AutoTokenizer.from_pretrained(folder, **extra)  # part of being ready to generate from text
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, spec["dtype"]), **extra).eval()

    def generate(ids: list[int], batch: int, n: int) -> tuple[list[int], float, list[float]]:
        stamps: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value) -> None:
                stamps.append(time.perf_counter())  # the first call hands over the prompt

            def end(self) -> None:
                pass

        start = time.perf_counter()
        out = model.generate(
            torch.tensor([ids] * batch),
            attention_mask=torch.ones(batch, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=[],  # through EOS, as kvgen does
            pad_token_id=0,
            streamer=Clock(),
        )
        return out[0, len(ids) :].tolist(), start, stamps[1:]

    return generate, weight_bytes_per_token(model), spec["dtype"]


def load_llama_cpp(spec: dict) -> tuple[Generate, int, str]:
    """llama.cpp through llama-cpp-python on the GGUF as it is (its own quantised kernels), greedy."""
    from llama_cpp import Llama

    threads = spec["threads"]
    llm = Llama(
        model_path=spec["model_file"],
        n_ctx=len(spec["ids"]) + spec["new_tokens"] + 8,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def generate(ids: list[int], batch: int, n: int) -> tuple[list[int], float, list[float]]:
        tokens, stamps = [], []
        llm.reset()  # forget the previous run, or its prompt would be reused from the KV cache
        start = time.perf_counter()
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            stamps.append(time.perf_counter())
            if len(tokens) == n:  # llama.cpp's generator ignores EOS: it runs until we stop
                break
        return tokens, start, stamps

    return generate, gguf_bytes_per_token(gguf_tensor_bytes(Path(spec["model_file"]))), "GGUF as stored"


LOADERS = {
    "kvgen": load_kvgen,
    "kvgen-reference": load_kvgen,
    "hf": load_hf,
    "llama.cpp": load_llama_cpp,
}


def worker_main(spec_json: str) -> None:
    """One system in its own process: load it, reply with the load time, then answer each request
    read from stdin, `[batch, new_tokens]`, with one timed generation. A reply is one JSON line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never between the replies

    def reply(**fields) -> None:
        replies.write(json.dumps(fields) + "\n")
        replies.flush()

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    generate, weight_bytes, weights = LOADERS[spec["system"]](spec)
    reply(load_s=time.perf_counter() - start, weight_bytes_per_token=weight_bytes, weights=weights)
    for line in sys.stdin:
        batch, n = json.loads(line)
        tokens, begin, stamps = generate(spec["ids"], batch, n)
        reply(tokens=tokens, seconds=stamps[-1] - begin, ttft_s=stamps[0] - begin, decode_s=stamps[-1] - stamps[0],
              peak_rss_mb=peak_rss_mb())  # fmt: skip


# ---- parent: machine, prompt, workers, table, JSON, plot ----------------------------------------


def memory_bandwidth_gb_s(threads: int, gib: int = 1, repeats: int = 5) -> float:
    """This machine's memory read bandwidth: the best of `repeats` sums of a `gib` GiB float32 tensor
    (far larger than any cache), with the threads the systems get."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(gib * 2**28)  # written once, so every page is resident before timing
        x.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - start)
        return x.numel() * x.element_size() / best / 1e9
    finally:
        torch.set_num_threads(previous)


def machine_info(threads: int, gb_s: float) -> dict:
    """The processor, its relevant instruction sets, the software versions, and the measured bandwidth."""
    import transformers

    from .loading.dtype import FEATURES, cpu_name_and_flags

    name, flags = cpu_name_and_flags()
    return dict(
        cpu=name,
        logical_cpus=os.cpu_count(),
        physical_cores=_physical_cores(),
        threads=threads,
        cpu_flags=[f for f in (*FEATURES, "amx_tile", "amx_int8") if f in flags],
        torch=torch.__version__,
        transformers=transformers.__version__,
        llama_cpp_python=_llama_cpp_version(),
        memory_read_gb_s=gb_s,
        bandwidth_method=f"best of 5 sums of a 1 GiB float32 tensor, {_threads(threads)}",
    )


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def _llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def llama_cpp_problem() -> str | None:
    """Why llama.cpp cannot run here (not installed, or its library does not load); None if it can."""
    try:
        import llama_cpp  # noqa: F401  (loads the compiled library: a broken build fails here)
    except Exception as e:  # ImportError, or OSError from a library that does not load
        return f"llama-cpp-python is not usable ({type(e).__name__}: {e}); {LLAMA_CPP_HINT}"
    return None


def prompt_ids(folder: Path, n: int) -> list[int]:
    """The first `n` token ids of the repeated text, by kvgen's tokenizer for this model."""
    tokenizer = load_tokenizer(folder)
    text = TEXT
    while len(ids := tokenizer.encode(text)) < n:
        text += TEXT
    return ids[:n]


class Worker:
    """One system's worker process (`python -m kvgen.bench --worker SPEC`), loaded on creation and
    then asked for one generation at a time; `loaded` is its first reply, None if it failed."""

    def __init__(self, spec: dict) -> None:
        self.system = spec["system"]
        self.errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the worker
        env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
        command = [sys.executable, "-m", "kvgen.bench", "--worker", json.dumps(spec)]
        pipe = subprocess.PIPE
        self.process = subprocess.Popen(command, env=env, stdin=pipe, stdout=pipe, stderr=self.errors, text=True)
        self.loaded = self._reply()

    def run(self, batch: int, new_tokens: int) -> dict | None:
        """One generation: {tokens, seconds, ttft_s, decode_s, peak_rss_mb}; None if the worker failed."""
        try:
            self.process.stdin.write(json.dumps([batch, new_tokens]) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it has exited: _reply says why
        return self._reply()

    def _reply(self) -> dict | None:
        if line := self.process.stdout.readline():
            return json.loads(line)
        code = self.process.wait()
        self.errors.seek(0)
        last = (self.errors.read().strip().splitlines() or [f"exit status {code}"])[-1]
        print(f"kvgen bench: {self.system} failed (exit status {code}): {last}", file=sys.stderr)
        return None

    def close(self) -> None:
        """End the requests (the worker then exits) and wait for it; kill it if it hangs."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:  # it had exited already
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.errors.close()


def schedule(batches: dict[str, list[int]], repeats: int) -> list[tuple[str, int, bool]]:
    """The order of the runs, as (system, batch, timed): batch sizes ascending; at each, every
    system's untimed warm-up, then `repeats` rounds in which every system runs once, in an order
    rotated each round. A machine that slows down or speeds up meanwhile weighs on all alike."""
    order = []
    for batch in sorted({b for sizes in batches.values() for b in sizes}):
        systems = [system for system, sizes in batches.items() if batch in sizes]
        order += [(system, batch, False) for system in systems]
        for r in range(repeats):
            turn = r % len(systems)
            order += [(system, batch, True) for system in systems[turn:] + systems[:turn]]
    return order


def figures(system: str, batch: int, prompt_len: int, loaded: dict, runs: list[dict], warm_up_s: float) -> dict:
    """One result row from a system's timed runs at one batch size (medians)."""
    n = len(runs[0]["tokens"])
    ttft = statistics.median(run["ttft_s"] for run in runs)
    decodes = [batch * (n - 1) / run["decode_s"] for run in runs]
    decode = statistics.median(decodes)
    return dict(
        system=system,
        batch=batch,
        decode_tok_s=decode,
        prefill_tok_s=batch * prompt_len / ttft,
        ttft_s=ttft,
        load_s=loaded["load_s"],
        peak_rss_mb=runs[-1]["peak_rss_mb"],  # after this batch size's last run
        weight_bytes_per_token=loaded["weight_bytes_per_token"],
        weights=loaded["weights"],
        # a step reads the weights once for the whole batch
        gb_s=loaded["weight_bytes_per_token"] * decode / batch / 1e9,
        tokens=runs[0]["tokens"],
        warm_up_s=warm_up_s,
        decode_tok_s_runs=decodes,  # each timed run's, in the order they ran: the spread behind the median
    )


# After a run, a worker's idle OpenMP threads spin for ~10 ms of CPU (measured with torch's) before
# they sleep: the next run waits that long, so that it starts with both cores.
SETTLE_S = 0.05


def measure_all(base: dict, batches: dict[str, list[int]], repeats: int) -> list[dict]:
    """Load each system in its own worker, one after another, then run them interleaved (`schedule`):
    one result row per system and batch size, for the systems that ran to the end."""
    workers: dict[str, Worker] = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    warm_ups: dict[tuple[str, int], float] = {}
    try:
        for system in batches:
            print(f"kvgen bench: loading {LABELS[system]} ...", file=sys.stderr, flush=True)
            worker = Worker(dict(base, system=system))
            if worker.loaded:
                workers[system] = worker
            else:
                worker.close()
        current = None
        for system, batch, timed in schedule({s: batches[s] for s in workers}, repeats):
            if system not in workers:  # failed earlier
                continue
            if batch != current:
                current = batch
                rounds = f"a warm-up each, then {repeats} round{'s' * (repeats != 1)} taking turns"
                print(f"kvgen bench: batch {batch}: {rounds} ...", file=sys.stderr, flush=True)
            # The warm-up runs at the timed prompt length (kernel choice, first-touch pages).
            time.sleep(SETTLE_S)
            result = workers[system].run(batch, base["new_tokens"] if timed else 2)
            if result is None:
                workers.pop(system).close()
            elif timed:
                runs.setdefault((system, batch), []).append(result)
            else:
                warm_ups[system, batch] = result["seconds"]
    finally:
        for worker in workers.values():
            worker.close()
    return [
        figures(system, batch, len(base["ids"]), workers[system].loaded, runs[system, batch], warm_ups[system, batch])
        for system in workers
        for batch in batches[system]
    ]


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def add_quality(results: list[dict], base: dict, tokens: int) -> None:
    """Each batch-1 row of kvgen and llama.cpp gets its KL divergence from the float32 reference and
    its top-1 agreement over `tokens` positions of the built-in text: `kvgen quality`'s
    measurement, the same for both engines (llama.cpp's logits through llama-cpp-python)."""
    import kvgen

    from .perplexity import long_text
    from .quality import chunk_logits, compare, llama_cpp_logits

    reference = kvgen.load(base["model"], dtype="float32", quantize="none")
    ids = reference.encode(long_text())[:tokens]
    paths = {"kvgen": "auto", "kvgen-reference": "none"}
    for row in (r for r in results if r["batch"] == 1):
        if row["system"] in paths:
            fast = kvgen.load(base["model"], dtype=base["dtype"], quantize=paths[row["system"]])
            logits = chunk_logits(fast.model, ids)
        elif row["system"] == "llama.cpp":
            logits = llama_cpp_logits(base["model_file"], ids, threads=base["threads"])
        else:
            continue
        quality = compare(chunk_logits(reference.model, ids), logits, ids)
        row["kld"], row["top1_agreement"], row["quality_tokens"] = (
            quality.mean_kld,
            quality.top1_agreement,
            quality.tokens,
        )


def print_table(results: list[dict], title: str, notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("system", "batch", "weights", "load s", "peak RSS MB", "TTFT s", "prefill tok/s", "decode tok/s")
    quality = any("kld" in r for r in results)
    for column in (
        *columns,
        "MB/token",
        "GB/s",
        "% of limit",
        "= kvgen tokens",
        *(("KLD", "top-1") if quality else ()),
    ):
        table.add_column(
            column, justify="left" if column in ("system", "weights") else "right", no_wrap=column == "system"
        )
    for r in results:
        table.add_row(
            LABELS[r["system"]],
            str(r["batch"]),
            r["weights"],
            _fmt(r["load_s"], 2),
            _fmt(r["peak_rss_mb"], 0),
            _fmt(r["ttft_s"], 3),
            _fmt(r["prefill_tok_s"], 0),
            _fmt(r["decode_tok_s"]),
            _fmt(r["weight_bytes_per_token"] / 1e6, 0),  # weight bytes a decode step reads
            _fmt(r["gb_s"]),
            _fmt(r["bandwidth_pct"], 0),
            {True: "yes", False: "no", None: "-"}[r.get("tokens_match_kvgen")],
            *((_fmt(r.get("kld"), 5), _fmt(100 * r["top1_agreement"] if "kld" in r else None, 1)) if quality else ()),
        )
    console = Console(highlight=False, width=max(180, Console().width))  # a file or pipe: the whole row
    console.print(table)
    for note in notes:
        console.print(note)


def bench_figure(results: list[dict], title: str):
    """Six panels of bars, one bar per system x batch: decode, prefill, TTFT, load, peak RSS, % of limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("decode_tok_s", "decode tok/s (aggregate)"),
        ("prefill_tok_s", "prefill tok/s (aggregate)"),
        ("ttft_s", "time to first token, s"),
        ("load_s", "load, s"),
        ("peak_rss_mb", "peak RSS, MB"),
        ("bandwidth_pct", "% of memory bandwidth limit"),
    )
    colours = {"kvgen": "tab:blue", "kvgen-reference": "tab:cyan", "hf": "tab:orange", "llama.cpp": "tab:green"}
    # one word a line: "kvgen-reference" beside its neighbours would overlap them
    labels = [f"{r['system'].replace('-', chr(10))}\nbatch {r['batch']}" for r in results]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (key, name) in zip(axes.flat, panels):
        values = [r[key] for r in results]
        bars = ax.bar(range(len(results)), values, color=[colours[r["system"]] for r in results])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=8)
        ax.set_xticks(range(len(results)), labels, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _model_folder(source: Path, dtype: str, gguf: bool, reference: bool) -> tuple[Path, str]:
    """The folder kvgen loads (a GGUF is converted into the kvgen cache now, if it is not there yet,
    as `kvgen.load` would, and for the float reference too, so that their timed loads are warm) and
    a note saying which it was."""
    from . import plan_load
    from .loading import resolve_model
    from .loading.convert import cached_folder, is_complete

    if not gguf:
        return resolve_model(source), "each system loads the same model folder"
    keep_blocks = plan_load(source, dtype, "cpu", "native", "auto")[3]
    variants = [keep_blocks, *([False] if reference and keep_blocks else [])]
    ready = all(is_complete(cached_folder(source, getattr(torch, dtype), keep_blocks=k), k) for k in variants)
    start = time.perf_counter()
    folder = [resolve_model(source, getattr(torch, dtype), k) for k in variants][0]
    when = "earlier" if ready else f"just now, in {time.perf_counter() - start:.1f} s"
    return folder, f"kvgen's load is warm: the GGUF was converted into the kvgen cache {when}"


def _check_fits(folder: Path, dtype: str, prompt_tokens: int, new_tokens: int) -> None:
    from .loading import model_info

    context = model_info(folder, getattr(torch, dtype))["context_length"]
    if context and prompt_tokens + new_tokens > context:
        raise ValueError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the model's context of {context}")


def _mark_same_tokens(results: list[dict]) -> None:
    """Each peer's row: whether row 0's greedy tokens equal kvgen's at the same batch size (None: no
    kvgen row). Expected in float32; bfloat16 rounding or llama.cpp's quantised activations may differ."""
    kvgen_tokens = {r["batch"]: r["tokens"] for r in results if r["system"] == "kvgen"}
    for r in results:
        if r["system"] != "kvgen":
            r["tokens_match_kvgen"] = r["tokens"] == kvgen_tokens[r["batch"]] if r["batch"] in kvgen_tokens else None


def run_bench(args: argparse.Namespace) -> int:
    """`kvgen bench`: run kvgen and each peer in turn; print the table (or, with --json, the JSON
    document), write the document to -o FILE and draw the plot."""
    from .loading import default_model, model_source
    from .loading.dtype import resolve_dtype
    from .loading.gguf import is_gguf
    from .trace import check_output, emit_json, save_figure

    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2: decode speed is timed from the first token to the last")
    check_output(args.output)
    check_output(args.plot, ".png")
    source = Path(model_source(args.model)).expanduser() if args.model else default_model()
    gguf = is_gguf(source)
    dtype = str(resolve_dtype(args.dtype, quantized=gguf)).removeprefix("torch.")  # as kvgen.load chooses it
    folder, load_note = _model_folder(source, dtype, gguf, args.reference)
    _check_fits(folder, dtype, args.prompt_tokens, args.new_tokens)
    systems = ["kvgen", *(["kvgen-reference"] if args.reference else []), *args.against]
    if "llama.cpp" in systems and (problem := llama_cpp_problem() or (None if gguf else "it needs a GGUF file")):
        print(f"kvgen bench: skipping llama.cpp: {problem}", file=sys.stderr)
        systems.remove("llama.cpp")

    threads = args.threads or torch.get_num_threads()
    ids = prompt_ids(folder, args.prompt_tokens)
    gb_s = memory_bandwidth_gb_s(threads)
    machine = machine_info(threads, gb_s)
    base = dict(
        model=str(source), model_file=str(source if gguf else folder), gguf=gguf, dtype=dtype, threads=threads,
        ids=ids, new_tokens=args.new_tokens,
    )  # fmt: skip
    batches = {system: [1] if system == "llama.cpp" else args.batch for system in systems}
    results = []
    for row in measure_all(base, batches, args.repeats):
        row["bandwidth_pct"] = 100 * row["gb_s"] / gb_s
        results.append({key: row[key] for key in RESULT_KEYS} | row)  # the documented keys first
    if not results:
        print("kvgen bench: no system ran", file=sys.stderr)
        return 1
    _mark_same_tokens(results)
    if args.quality:
        add_quality(results, base, args.quality)

    name = args.model or "default model (Gemma 3 270M Q4_K_M GGUF)"
    title = (
        f"{name}: {len(ids)}-token prompt, {args.new_tokens} new tokens, greedy, {_threads(threads)}, "
        f"median of {args.repeats}"
    )
    notes = [
        f"memory read bandwidth {gb_s:.1f} GB/s ({machine['bandwidth_method']}); GB/s = weight bytes read per "
        "decode step x steps/s; batch > 1: aggregate tok/s",
        load_note,
    ]
    if "llama.cpp" in systems:
        notes.append("llama.cpp runs batch 1 only, on the GGUF's own quantised weights")
    if not args.json:
        print_table(results, title, notes)
    doc = dict(machine=machine, model=str(source), dtype=dtype, prompt_tokens=len(ids))
    doc.update(new_tokens=args.new_tokens, repeats=args.repeats, results=results)
    emit_json(doc, args.json, args.output, indent=1)
    if args.plot:
        save_figure(bench_figure(results, title), args.plot)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m kvgen.bench --worker SPEC (run `kvgen bench` instead)")
