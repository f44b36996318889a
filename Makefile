# lmtk: the two set-up commands in README are `make demo` and `make test`.
#
# Environment: inside a virtual environment already (VIRTUAL_ENV set, or $(PY) is a venv's
# python: sys.prefix != sys.base_prefix), that environment is used. Otherwise the Makefile makes
# and uses a project one, .venv (Debian/Ubuntu's system Python refuses `pip install`, PEP 668).
# `make install` runs pip only when pyproject.toml is newer than the stamp file in the environment.
PY ?= python3
# CPU machines: the pin takes the CPU wheel where one lies on disk (pip's find-links); elsewhere
# install a CPU torch first: pip install torch --index-url https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
# extra pytest arguments, e.g. make test PYTEST_ARGS="tests/test_config.py -x"
PYTEST_ARGS ?=

IN_VENV := $(shell [ -n "$$VIRTUAL_ENV" ] && echo 1 || $(PY) -c "import sys; print(1 if sys.prefix != sys.base_prefix else '')" 2>/dev/null)
ifeq ($(IN_VENV),1)
VENV_PY := $(PY)
ENV_DIR := $(shell $(PY) -c "import sys; print(sys.prefix)" 2>/dev/null)
else
VENV := .venv
VENV_PY := $(VENV)/bin/python
ENV_DIR := $(VENV)
endif
PIP := $(VENV_PY) -m pip
STAMP ?= $(ENV_DIR)/.lmtk-installed

.PHONY: install demo test test-all smoke lint bench bench-all clean

install: $(STAMP)

.venv/bin/python:
	$(PY) -m venv .venv || { echo "could not create .venv: install the venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

# the stamp depends on pyproject.toml, so a second `make test` installs nothing
$(STAMP): pyproject.toml | $(if $(VENV),$(VENV_PY))
	@$(VENV_PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	@touch $@

demo: install
	$(VENV_PY) -m lmtk train

# pytest exits 5 when it collected no test: that is a failure, not a pass
test: install
	@$(VENV_PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no test (exit 5)" >&2; exit 1; fi; exit $$rc

# the whole pipeline (train -> eval -> LoRA -> distil -> eval -> generate -> plot) on a CPU in a few minutes
smoke: install
	PY=$(VENV_PY) bash scripts/smoke.sh

test-all: install
	$(VENV_PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint:
	$(VENV_PY) -m ruff check lmtk tests bench 2>/dev/null || $(VENV_PY) -m compileall -q lmtk tests bench

# issue 5's three benchmarks (the bench extra brings transformers; mfu.py is a smoke run without a GPU)
bench: install
	$(PIP) install -q -e ".[dev,bench]"
	$(VENV_PY) bench/vs_hf.py
	$(VENV_PY) bench/data.py
	$(VENV_PY) bench/mfu.py

bench-all: bench
	$(VENV_PY) bench/throughput.py
	$(VENV_PY) bench/cram.py
	$(VENV_PY) bench/compile.py
	$(VENV_PY) bench/hybrid.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
