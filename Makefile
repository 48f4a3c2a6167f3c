# The two commands a newcomer needs:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench clean one-box

$(BIN)/pecbir: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing pe-cbir and its dependencies into $(VENV) (2-3 min on a fresh machine)"
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	# the [gpu] extra's torch, pinned: 2.13.0 is the CPU wheel on this machine's disk (an
	# unpinned torch downloads a multi-GB CUDA build); the torch parity tests run on it
	$(BIN)/pip install --progress-bar on 'torch==2.13.0'
	@touch $@

setup: $(BIN)/pecbir

demo: setup
	$(BIN)/pecbir demo

# The real stack on loopback (radosgw, Redis, services, encryptor); Ctrl-C stops it.
one-box: setup
	$(BIN)/pecbir serve --one-box

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/pecbir bench cipher

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
