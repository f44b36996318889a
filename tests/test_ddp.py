"""Data parallelism: 2 gloo processes under torchrun == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

ARGS = [
    "budget.hours=null", "budget.steps=6", "data.max_chars=300000", "tokenizer.vocab_size=512",
    "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "data.seq_len=32", "train.batch_size=8",
    "train.micro_batch_size=4", "logger.every=1", "val.tokens=2048", "objective=mlm", "checkpoint.every=3",
]


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    env = dict(os.environ, LMTK_RUNS=str(tmp_path / "runs"), LMTK_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "lmtk", "train", *ARGS, "run.name=single"], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "lmtk", "train", *ARGS, "run.name=ddp"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = _losses(runs / "single"), _losses(runs / "ddp")
    assert len(a) == len(b) == 6
    assert all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    wa, wb = load_file(runs / "single/checkpoints/final/model.safetensors"), load_file(runs / "ddp/checkpoints/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # rank 0 alone wrote the run: one run directory, one writer's metrics
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]
    info = json.loads((runs / "ddp" / "run.json").read_text())
    assert info["status"] == "done" and "x 2 ranks" in info["device"]
    assert sorted(p.name for p in (runs / "ddp" / "checkpoints").iterdir()) == ["final", "step-000003"]
