"""Helpers shared by the test modules (imported as `helpers`; conftest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The embedded corpus capped so tokenisation takes a second or two; every e2e test uses the
# same data and tokenizer settings so the session cache tokenises it once.
DATA = ["data.max_chars=500000", "tokenizer.vocab_size=1000", "budget.hours=null"]
# d_ff=null: the default recipe's d_ff (320) is sized for d_model 128; tests keep the width rule's
TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=null"]
# Smallest runs: plumbing only (run directory, cache, resume, CLI).
TINY = [*DATA, *TINY_MODEL, "data.seq_len=32", "val.tokens=2048", "train.batch_size=8", "train.micro_batch_size=8"]
# Runs that must learn something: val loss clearly below the start and the unigram model.
QUALITY = [
    *DATA, "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=null", "data.seq_len=64", "val.tokens=8192",
    "train.batch_size=16", "train.micro_batch_size=16", "train.lr=3e-3", "logger.every=10",
]


@dataclass
class Env:
    runs: Path
    cache: Path


def reset_console() -> None:
    """`lmtk recipes` / `lmtk runs` point the shared rich console at (CliRunner's) stdout; undo it."""
    from lmtk.log import console

    console.file = None


def cli(*args: str):
    """`lmtk ARGS` in-process; returns the click Result (exit_code, output, exception)."""
    from typer.testing import CliRunner

    from lmtk.cli import app

    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        reset_console()


def ok(command: str, *args):
    """`lmtk COMMAND ARGS` in-process; fails the test with the output when it does not succeed."""
    import traceback

    res = cli(command, *args)
    if res.exit_code != 0:
        tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
        raise AssertionError(f"lmtk {command} {' '.join(map(str, args))} exited {res.exit_code}\n{res.output[-3000:]}\n{tb}")
    return res


def train(*args: str):
    """`lmtk train ARGS` in-process (helpers.ok)."""
    return ok("train", *args)


def lmtk(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m lmtk ARGS` in a subprocess with the current LMTK_RUNS / LMTK_CACHE."""
    e = dict(os.environ)
    e.pop("LMTK_DEBUG", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lmtk", *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout
    )


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def val_losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["val/loss"]) for m in metrics(run) if "val/loss" in m]


def info(run: Path) -> dict:
    return json.loads((Path(run) / "run.json").read_text())
