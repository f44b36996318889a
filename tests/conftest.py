"""Shared fixtures: every test runs with LMTK_RUNS / LMTK_CACHE in temporary directories.

Nothing here touches ~/.cache/lmtk or ./runs: the autouse `lmtk_env` fixture points
LMTK_RUNS at a per-test directory, LMTK_CACHE at a session-wide temporary cache (tokenizers
and token caches are shared between tests for speed), and chdirs into the test's tmp_path.
Tests that check cache behaviour use `fresh_cache` instead.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Hugging Face libraries read these at import: keep them offline and off ~/.cache.
_HF_HOME = tempfile.mkdtemp(prefix="lmtk-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
# no plots at the end of every test run (~2 s each with matplotlib); tests/test_plot.py turns them on
os.environ["LMTK_PLOTS"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from the test modules

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One LMTK_CACHE for the whole session: the tiny corpus is tokenised once."""
    return tmp_path_factory.mktemp("lmtk-cache")


@pytest.fixture(autouse=True)
def lmtk_env(monkeypatch, tmp_path, shared_cache):
    """LMTK_RUNS -> tmp_path/runs, LMTK_CACHE -> the session cache, cwd -> tmp_path."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("LMTK_RUNS", str(runs))
    monkeypatch.setenv("LMTK_CACHE", str(shared_cache))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no truncated run names
    monkeypatch.chdir(tmp_path)
    yield helpers.Env(runs=runs, cache=shared_cache)
    helpers.reset_console()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path) -> Path:
    """An empty LMTK_CACHE of this test's own (for tests of cache behaviour)."""
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("LMTK_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def clm_run(tmp_path_factory, shared_cache) -> Path:
    """One finished tiny CLM run (default recipe), shared by the tests that only read it."""
    runs = tmp_path_factory.mktemp("clm-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(runs))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*helpers.QUALITY, "budget.steps=60", "run.name=clm")
    helpers.reset_console()
    return runs / "clm"
