# lmtk: the two set-up commands in README are `make demo` and `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
# CPU machines: a pinned torch takes the local CPU wheel; an unpinned one pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-all lint bench bench-all clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"

demo: install
	lmtk train

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m "slow or not slow"

lint:
	$(PY) -m ruff check lmtk tests bench 2>/dev/null || $(PY) -m compileall -q lmtk tests bench

# issue 5's three benchmarks (the bench extra brings transformers; mfu.py is a smoke run without a GPU)
bench: install
	$(PIP) install -q -e ".[dev,bench]"
	$(PY) bench/vs_hf.py
	$(PY) bench/data.py
	$(PY) bench/mfu.py

bench-all: bench
	$(PY) bench/throughput.py
	$(PY) bench/cram.py
	$(PY) bench/compile.py
	$(PY) bench/hybrid.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
