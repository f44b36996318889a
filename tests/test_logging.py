"""Logging: metrics.jsonl always, plain progress lines off a terminal, wandb offline without an account."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TINY = [
    "budget.hours=null", "budget.steps=4", "data.max_chars=300000", "tokenizer.vocab_size=512", "model.n_layers=2",
    "model.d_model=32", "model.n_heads=2", "data.seq_len=32", "train.batch_size=8", "train.micro_batch_size=4",
    "val.tokens=2048", "logger.every=2",
]


def test_progress_metrics_and_wandb_offline(tmp_path):
    pytest.importorskip("wandb")  # an optional extra (lmtk[wandb]); without it logger=wandb is an error
    env = dict(os.environ, LMTK_RUNS=str(tmp_path / "runs"), LMTK_CACHE=str(tmp_path / "cache"),
               WANDB_MODE="offline", WANDB_API_KEY="", WANDB_SILENT="true")
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", *TINY, "run.name=w", "logger=wandb"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    progress = [l for l in p.stderr.splitlines() if "ETA" in l]
    assert len(progress) == 2 and all("loss" in l and "tok/s" in l and "lr" in l for l in progress)
    assert "tokens seen" in p.stderr and "unigram bits/byte" in p.stderr  # the summary table
    run = tmp_path / "runs" / "w"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all({"lr", "tok/s", "tokens", "grad_norm", "batch"} <= r.keys() for r in train_rows)
    assert any("val/bpb" in r for r in rows)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "wandb did not write an offline run"
