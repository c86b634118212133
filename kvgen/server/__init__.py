"""`kvgen serve`: an OpenAI-compatible HTTP server with continuous batching and prompt-cache reuse.

`engine` owns the model (one thread, a step loop), `prefix_cache` keeps finished streams' KV,
`schemas` and `app` are the HTTP API (FastAPI), `playground.html` the page at `/`.
"""

from __future__ import annotations

import os
import signal

GRACE_SECONDS = 5  # on SIGTERM/SIGINT, how long running requests may take to finish before they are cancelled


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 256,
    api_key: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    served_model_name: str | None = None,
    prefix_cache_mb: float = 256,
    quantize: str = "auto",
    max_tokens_limit: int | None = 4096,
    prefill_chunk: int = 256,
) -> None:
    """Load `model` and serve it until SIGTERM or SIGINT. `api_key` (or $KVGEN_API_KEY) guards every
    /v1 route; `max_tokens_limit` caps one request's generated tokens (None: the context);
    `prefill_chunk`: see `engine.PREFILL_CHUNK`; `quantize`: see `kvgen.load`.

    A signal stops the server gracefully: it accepts nothing more, gives running requests
    `GRACE_SECONDS` to finish, cancels the rest and returns; a second signal returns at once.
    """
    import uvicorn

    import kvgen

    from .app import create_app
    from .engine import Engine

    if max_batch < 1 or max_queue < 0 or prefix_cache_mb < 0:
        raise ValueError("--max-batch must be at least 1, --max-queue and --prompt-cache-mb at least 0")
    if (max_tokens_limit is not None and max_tokens_limit < 1) or prefill_chunk < 1:
        raise ValueError("--max-tokens-limit and --prefill-chunk must be at least 1")
    lm = kvgen.load(model, dtype=dtype, device=device, quantize=quantize)
    engine = Engine(lm, max_batch, max_queue, int(prefix_cache_mb * 2**20), prefill_chunk)
    name = served_model_name or (model if model is not None else "gemma-3-270m")
    app = create_app(engine, name, api_key or os.environ.get("KVGEN_API_KEY") or None, max_tokens_limit)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS)
    print(f"kvgen: serving {name} on http://{host}:{port} (max batch {max_batch})", flush=True)
    # uvicorn raises the signal again once it has shut down, which would end the process by the
    # signal (status 143) rather than by returning: from now on, the signals do nothing else.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server = uvicorn.Server(config)
    handle_exit = server.handle_exit

    def second_signal_forces(sig, frame) -> None:  # uvicorn forces only on a second SIGINT
        server.force_exit = server.should_exit
        handle_exit(sig, frame)

    server.handle_exit = second_signal_forces
    server.run()
    print("kvgen: stopped", flush=True)
