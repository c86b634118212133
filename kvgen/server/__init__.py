"""`kvgen serve`: an OpenAI-compatible HTTP server with continuous batching and prompt-cache reuse.

`engine` owns the model (one thread, a step loop), `prefix_cache` keeps finished streams' KV,
`schemas` and `app` are the HTTP API (FastAPI), `playground.html` the page at `/`.
"""

from __future__ import annotations

import os


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
) -> None:
    """Load `model` and serve it until interrupted. `api_key` (or $KVGEN_API_KEY) guards every /v1 route.
    `quantize`: see `kvgen.load`."""
    import uvicorn

    import kvgen

    from .app import create_app
    from .engine import Engine

    if max_batch < 1 or max_queue < 0 or prefix_cache_mb < 0:
        raise ValueError("--max-batch must be at least 1, --max-queue and --prompt-cache-mb at least 0")
    lm = kvgen.load(model, dtype=dtype, device=device, quantize=quantize)
    engine = Engine(lm, max_batch, max_queue, int(prefix_cache_mb * 2**20))
    name = served_model_name or (model if model is not None else "gemma-3-270m")
    app = create_app(engine, name, api_key or os.environ.get("KVGEN_API_KEY") or None)
    print(f"kvgen: serving {name} on http://{host}:{port} (max batch {max_batch})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
