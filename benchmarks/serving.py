"""A real `kvgen serve` for the server benchmarks: a subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

MODEL_NAME = "bench-model"  # what the benchmarks send as `model`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def kvgen_server(model: str | None, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`kvgen serve [-m MODEL] ARGS` until the block ends; yields the process and its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kvgen", "serve", "--port", str(port), "--served-model-name", MODEL_NAME]
    command += (["-m", model] if model else []) + list(args)
    log = Path(tempfile.mkdtemp()) / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 300  # a real model may be converted first
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"kvgen serve did not start:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield server, url
    finally:
        server.terminate()
        server.wait(timeout=30)


def rss_mb(pid: int) -> float:
    """The process's resident set now, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")
