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
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# `make demo LONG=1` adds a perplexity run past a small window (several minutes).
demo: $(STAMP)
	$(BIN)/python -m kvgen.demo $(if $(LONG),--long)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) .pytest_cache
