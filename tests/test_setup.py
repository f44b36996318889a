"""The README's set-up commands (`make demo`, `make test`): a project .venv outside a virtual
environment (PEP 668 systems refuse a system-wide pip install), no reinstall when nothing changed,
and pytest's "no tests ran" (exit 5) is a failure. Checked with `make -n` (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

BASE_PY = next((p for p in (Path(sys.base_prefix) / "bin" / n for n in ("python3", "python")) if p.exists()), None)


def make(*args: str, venv: str | None = None, where: Path = helpers.REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    if venv:
        env["VIRTUAL_ENV"] = venv
    return subprocess.run(["make", "-C", str(where), "--no-print-directory", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def stamp(tmp_path: Path, fresh: bool) -> Path:
    s = tmp_path / "stamp"
    s.touch()
    if not fresh:  # older than pyproject.toml
        os.utime(s, (0, 0))
    return s


@pytest.mark.skipif(BASE_PY is None, reason="no base interpreter found")
@pytest.mark.parametrize("target", ["demo", "test"])
def test_outside_a_venv_make_creates_and_uses_dot_venv(target, tmp_path):
    # -B: as on a fresh clone, even where .venv exists already (CI's make test made it)
    out = make("-n", "-B", target, f"PY={BASE_PY}", f"STAMP={stamp(tmp_path, fresh=False)}").stdout
    lines = out.splitlines()
    assert any(f"{BASE_PY} -m venv .venv" in line for line in lines), out
    pip = [line for line in lines if "pip install" in line]
    assert pip and all(".venv/bin/python -m pip" in line for line in pip), out  # never the system pip
    run = ".venv/bin/python -m lmtk train" if target == "demo" else ".venv/bin/python -m pytest"
    assert any(line.startswith(run) for line in lines), out


def test_inside_a_venv_make_uses_it(tmp_path):
    out = make("-n", "test", f"PY={sys.executable}", f"STAMP={stamp(tmp_path, fresh=False)}", venv=sys.prefix).stdout
    assert "-m venv .venv" not in out and not any(line.startswith(".venv/") for line in out.splitlines()), out
    assert f"{sys.executable} -m pip install" in out and f"{sys.executable} -m pytest" in out


def test_nothing_is_reinstalled_while_pyproject_is_unchanged(tmp_path):
    fresh = make("-n", "test", f"PY={sys.executable}", f"STAMP={stamp(tmp_path, fresh=True)}", venv=sys.prefix).stdout
    assert "pip install" not in fresh and "-m pytest" in fresh, fresh
    stale = make("-n", "test", f"PY={sys.executable}", f"STAMP={stamp(tmp_path, fresh=False)}", venv=sys.prefix).stdout
    assert "pip install" in stale, stale


def test_make_test_fails_when_pytest_runs_no_test(tmp_path):
    """In a copy of the Makefile beside a tests/ folder with no test in it (PIP=: so nothing is
    installed whatever the Makefile does): pytest exits 5, and make test must fail."""
    proj = tmp_path / "proj"
    (proj / "tests").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(helpers.REPO / name, proj / name)
    (proj / "tests" / "test_nothing_here.py").write_text("# no tests\n")
    p = make("test", f"PY={sys.executable}", "PIP=:", f"STAMP={stamp(tmp_path, fresh=True)}",
             "PYTEST_ARGS=-p no:cacheprovider", venv=sys.prefix, where=proj)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "ran no test" in p.stderr
    assert "no tests ran" in p.stdout  # pytest's own closing line: it did run, and found nothing
