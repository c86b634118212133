import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/parity.py

from kvgen.testing import build_gpt2  # noqa: E402

# Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that
# wait on a busy core make each step many times slower. One thread also makes runs repeatable.
torch.set_num_threads(1)
# Compiling a model's layers takes seconds per layer shape and the suite loads dozens of shapes:
# the layers run as written, here and in the processes tests start, except in test_compiled.py.
os.environ["KVGEN_COMPILE"] = "off"


@pytest.fixture(scope="session")
def gpt2_tiny(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random GPT-2 with a trained byte-level BPE tokenizer."""
    return build_gpt2(tmp_path_factory.mktemp("gpt2-tiny"))


@pytest.fixture(scope="session")
def gemma270m(tmp_path_factory) -> tuple[Path, Path]:
    """(GGUF path, converted float32 folder): the embedded default model, converted once per session."""
    from kvgen.loading import default_model
    from kvgen.loading.convert import convert_gguf

    path = default_model()
    return path, convert_gguf(path, cache_dir=tmp_path_factory.mktemp("real-cache"), progress=False)


@pytest.fixture
def cli(capsys):
    """Run `kvgen ARGS...` in-process -> (exit status, stdout, stderr)."""
    from kvgen.cli import main

    def run(*args) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
