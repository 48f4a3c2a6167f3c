# The two commands a newcomer needs:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/pecbir: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the [gpu] extra's torch, pinned: 2.13.0 is the CPU wheel on this machine's disk (an
	# unpinned torch downloads a multi-GB CUDA build); the torch parity tests run on it
	$(BIN)/pip install --quiet 'torch==2.13.0'
	@touch $@

setup: $(BIN)/pecbir

demo: setup
	$(BIN)/pecbir demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/pecbir bench cipher

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
