# apm-bench: `make run` installs into .venv and runs the default benchmark; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-gpu bench suite leaderboard clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/apm run --method routing

test: setup
	$(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

suite: setup
	$(BIN)/apm suite run configs/leaderboard.yaml
	$(BIN)/apm leaderboard

leaderboard: setup
	$(BIN)/apm leaderboard

bench: setup
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
