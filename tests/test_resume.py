"""Deterministic resume: a run restarted from a mid-run checkpoint ends bit-identical to a
straight run (weights and per-step losses). The crash is simulated in the run directory;
test_reliability.py has the real SIGKILL version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import helpers

N = 4  # the straight run takes 2N steps; the crash happens after step N+1
COMMON = [*helpers.TINY, f"budget.steps={2 * N}", "logger.every=1", "schedule=cosine"]


def _weights(run):
    return load_file(str(run / "checkpoints" / "final" / "model.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"tensor {k} differs"


def _losses(run) -> dict[int, float]:
    rows = [m for m in helpers.metrics(run) if "loss" in m]
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), f"duplicate metrics rows in {run.name}: {steps}"
    return {m["step"]: m["loss"] for m in rows}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _simulate_crash(run, crashed_after: int) -> None:
    """What SIGKILL after step `crashed_after` leaves: no final/, no later checkpoints,
    metrics rows up to that step plus a torn line, status running, a stale lock."""
    ck = run / "checkpoints"
    shutil.rmtree(ck / "final")
    for d in ck.iterdir():
        if d.name.startswith("step-") and int(d.name[5:]) > crashed_after:
            shutil.rmtree(d)
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= crashed_after]
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 99, "loss": 1.2')  # torn last line
    info = helpers.info(run)
    info["status"] = "running"
    info.pop("summary", None)
    (run / "run.json").write_text(json.dumps(info))
    (run / ".lock").write_text(str(_dead_pid()))


def test_resume_is_bit_identical(lmtk_env):
    runs = lmtk_env.runs
    helpers.train(*COMMON, "run.name=A")
    helpers.train(*COMMON, "run.name=B", f"checkpoint.every={N // 2}", "checkpoint.keep=5")
    a, b = runs / "A", runs / "B"
    # checkpoints at N/2, N, 3N/2 (not at 2N: the end writes final/ instead)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == [
        "final", f"step-{N // 2:06d}", f"step-{N:06d}", f"step-{3 * N // 2:06d}"
    ]
    _assert_same_weights(a, b)  # checkpointing does not perturb training

    c = runs / "C"
    shutil.copytree(b, c)
    _simulate_crash(c, crashed_after=N + 1)
    with pytest.warns(UserWarning, match="stale lock"):
        helpers.train(*COMMON, "run.name=C", f"checkpoint.every={N // 2}", "checkpoint.keep=5", "resume=auto", "run.overwrite=false")

    info = helpers.info(c)
    assert info["status"] == "done" and info.get("resumed") == 1 and info["summary"]["steps"] == 2 * N
    _assert_same_weights(a, c)
    la, lc = _losses(a), _losses(c)
    assert sorted(la) == list(range(1, 2 * N + 1))
    assert lc == la  # every step's loss, exactly, and no duplicated rows from before the crash
    assert helpers.val_losses(c) == helpers.val_losses(a)
    assert not (c / ".lock").exists()


def test_resume_from_checkpoint_path_into_new_run(lmtk_env):
    runs = lmtk_env.runs
    helpers.train(*COMMON, "run.name=A")
    helpers.train(*COMMON, "run.name=B", f"checkpoint.every={N}")
    ckpt = runs / "B" / "checkpoints" / f"step-{N:06d}"
    assert ckpt.is_dir()
    helpers.train(*COMMON, "run.name=D", f"resume={ckpt}")
    _assert_same_weights(runs / "A", runs / "D")
    for f in ("config.yaml", "overrides.yaml", "tokenizer.json", "model.json"):  # a new run gets its own files
        assert (runs / "D" / f).is_file(), f"{f} missing in a run resumed from another run's checkpoint"
    ld = _losses(runs / "D")
    assert sorted(ld) == list(range(N + 1, 2 * N + 1))
    assert all(ld[s] == _losses(runs / "A")[s] for s in ld)


def test_resume_auto_refuses_a_finished_run(lmtk_env):
    helpers.train(*helpers.TINY, "budget.steps=1", "run.name=F")
    before = (lmtk_env.runs / "F" / "run.json").read_text()
    res = helpers.cli("train", *helpers.TINY, "budget.steps=1", "run.name=F", "resume=auto")
    assert res.exit_code != 0 and "already finished" in str(res.exception)
    assert (lmtk_env.runs / "F" / "run.json").read_text() == before


def test_resume_with_changed_model_is_refused(lmtk_env):
    runs = lmtk_env.runs
    helpers.train(*COMMON, "run.name=M", f"checkpoint.every={N}", "checkpoint.keep=5")
    shutil.rmtree(runs / "M" / "checkpoints" / "final")
    info = helpers.info(runs / "M")
    info["status"] = "interrupted"
    (runs / "M" / "run.json").write_text(json.dumps(info))
    before = {f: (runs / "M" / f).read_bytes() for f in ("run.json", "metrics.jsonl", "config.yaml")}
    res = helpers.cli("train", *COMMON, "run.name=M", "resume=auto", "model.d_model=48")
    assert res.exit_code != 0 and "cannot resume run 'M' with model.d_model=48: it was trained with model.d_model=32" in str(res.exception)
    assert {f: (runs / "M" / f).read_bytes() for f in before} == before  # refused before touching the run
    assert os.path.isdir(runs / "M" / "checkpoints" / f"step-{N:06d}")


def _interrupted_run(runs, name, *extra):
    """A run of 2N steps with step checkpoints, its final/ removed and its status interrupted."""
    helpers.train(*COMMON, f"run.name={name}", f"checkpoint.every={N}", "checkpoint.keep=5", *extra)
    shutil.rmtree(runs / name / "checkpoints" / "final")
    info = helpers.info(runs / name)
    info["status"] = "interrupted"
    (runs / name / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("change,was", [
    ("data.seq_len=16", "32"), ("seed=1", "0"), ("train.batch_size=16", "8"), ("train.micro_batch_size=4", "8"),
    ("data.max_chars=400000", "500000"), ("objective.mask_rate=0.3", "0.15"), ("tokenizer.vocab_size=900", "1000"),
])
def test_resume_refuses_a_change_of_what_the_run_is(lmtk_env, change, was):
    """Another data stream, seed, batch, objective or tokenizer would silently map the saved data
    position to other windows: refused, naming the key and both values, before touching the run."""
    runs = lmtk_env.runs
    _interrupted_run(runs, "R")
    before = {f: (runs / "R" / f).read_bytes() for f in ("run.json", "metrics.jsonl", "config.yaml")}
    res = helpers.cli("train", *COMMON, "run.name=R", "resume=auto", change)
    from lmtk.errors import UserError

    assert isinstance(res.exception, UserError), res.output  # the CLI prints it as one line, exit 2
    msg = str(res.exception)
    key, now = change.split("=")
    assert f"{key}={now}" in msg and f"{key}={was}" in msg, msg
    assert {f: (runs / "R" / f).read_bytes() for f in before} == before


def test_resume_records_allowed_changes(lmtk_env):
    """A longer budget, another logging cadence or learning rate keep the run the same run:
    allowed, recorded in run.json's history, and config.yaml says what the run now is."""
    runs = lmtk_env.runs
    _interrupted_run(runs, "H")
    helpers.train(*COMMON, "run.name=H", "resume=auto", f"budget.steps={2 * N + 2}", "logger.every=2")
    info = helpers.info(runs / "H")
    assert info["status"] == "done" and info["summary"]["steps"] == 2 * N + 2
    [entry] = info["history"]
    assert entry["step"] == N  # resumed from the step-N checkpoint (the last before 2N)
    assert entry["changed"] == {  # the checkpoint settings were not passed again: recorded as changed too
        "budget.steps": [2 * N, 2 * N + 2], "logger.every": [1, 2], "checkpoint.every": [N, 0], "checkpoint.keep": [5, 2],
    }
    assert f"budget.steps={2 * N + 2}" in entry["overrides"]
    cfg = (runs / "H" / "config.yaml").read_text()
    assert f"steps: {2 * N + 2}" in cfg and "every: 2" in cfg


def test_resume_at_a_step_between_log_lines(lmtk_env):
    """Resuming from a checkpoint that is not on a logging step (logger.every=3, checkpoint at 4)
    still replays the straight run: same weights, and the rows after the checkpoint are not doubled."""
    runs = lmtk_env.runs
    args = [*helpers.TINY, f"budget.steps={2 * N}", "logger.every=3", "schedule=cosine"]
    helpers.train(*args, "run.name=S")
    helpers.train(*args, "run.name=T", f"checkpoint.every={N}", "checkpoint.keep=5")
    shutil.rmtree(runs / "T" / "checkpoints" / "final")
    rows = [line for line in (runs / "T" / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= N + 1]
    (runs / "T" / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    info = helpers.info(runs / "T")
    info["status"] = "interrupted"
    (runs / "T" / "run.json").write_text(json.dumps(info))
    helpers.train(*args, "run.name=T", f"checkpoint.every={N}", "checkpoint.keep=5", "resume=auto")
    _assert_same_weights(runs / "S", runs / "T")
    steps_s = [m["step"] for m in helpers.metrics(runs / "S") if "loss" in m]
    steps_t = [m["step"] for m in helpers.metrics(runs / "T") if "loss" in m]
    assert steps_s == [3, 6, 8] and steps_t == steps_s


def _as_before_rope_layout(run) -> None:
    """Rewrite a run as lmtk wrote it before model.rope_layout existed: no such key anywhere."""
    import hashlib

    for f in [run / "model.json", *(run / "checkpoints").glob("*/meta.json")]:
        d = json.loads(f.read_text())
        model = d.get("model", d)
        assert model.pop("rope_layout") == "interleaved"
        f.write_text(json.dumps(d))
    for f in [run / "config.yaml", *(run / "checkpoints").glob("*/config.yaml")]:
        text = f.read_text()
        assert "rope_layout: interleaved\n" in text
        f.write_text(text.replace("  rope_layout: interleaved\n", ""))
        meta = f.parent / "meta.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            m["checksums"]["config.yaml"] = hashlib.sha256(f.read_bytes()).hexdigest()
            meta.write_text(json.dumps(m))


@pytest.mark.parametrize("layout, strip, resume_with", [
    ("interleaved", True, ["model.rope_layout=half"]),  # before the key existed; resumed under another layout
    ("half", False, []),  # the recipes' layout of 2026-11-29..12-02, resumed under today's default
])
def test_a_run_resumes_and_loads_in_its_own_rope_layout(lmtk_env, layout, strip, resume_with):
    """A checkpoint's weights are in its own rotary layout (interleaved where model.rope_layout is
    missing): resuming it under a config that says otherwise continues in that layout and ends
    bit-identical to a straight run; load_pretrained rebuilds it in that layout too."""
    from lmtk.checkpoint import load_pretrained

    runs = lmtk_env.runs
    old = ["model.positions=rope", f"model.rope_layout={layout}"]
    helpers.train(*COMMON, *old, "run.name=A")
    helpers.train(*COMMON, *old, "run.name=B", f"checkpoint.every={N}")
    if strip:
        _as_before_rope_layout(runs / "B")
    _simulate_crash(runs / "B", crashed_after=N)
    with pytest.warns(UserWarning, match="stale lock"):
        helpers.train(*COMMON, "model.positions=rope", *resume_with, "run.name=B", f"checkpoint.every={N}", "resume=auto")
    _assert_same_weights(runs / "A", runs / "B")
    assert _losses(runs / "B") == _losses(runs / "A")
    model, _, meta = load_pretrained(runs / "B" / "checkpoints" / f"step-{N:06d}")
    assert ("rope_layout" not in meta["model"]) == strip and model.cfg.rope_layout == layout
    ref, _, _ = load_pretrained(runs / "A")
    model, _, _ = load_pretrained(runs / "B")
    idx = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), ref(idx))
