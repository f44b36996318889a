"""Reliability promises (issue 3): exact resume after SIGKILL, atomic checkpoints, clean
interrupts, numerical guards, locks, safe loading. Each test fails without its feature."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtk.config import compose
from lmtk.errors import UserError
from lmtk.runs import RunDir

TINY = [
    "data.max_chars=300000", "tokenizer.vocab_size=512", "model.d_model=32", "model.n_layers=2",
    "model.n_heads=2", "data.seq_len=32", "train.batch_size=8", "train.micro_batch_size=4",
    "val.tokens=2048", "budget.hours=null", "logger.every=1", "train.lr=3e-3",
]


@pytest.fixture()
def env(tmp_path, monkeypatch):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    monkeypatch.setenv("LMTK_RUNS", str(runs))
    monkeypatch.setenv("LMTK_CACHE", str(cache))
    e = dict(os.environ, LMTK_RUNS=str(runs), LMTK_CACHE=str(cache))
    return runs, e


def lmtk(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "lmtk", *args], env=env, capture_output=True, text=True, **kw)


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train_inproc(name, extra=()):
    from lmtk.train.pretrain import run

    cfg = compose("default", TINY + [f"run.name={name}", *extra])
    return run(cfg, "default", list(extra))


def wait_for_step(run: Path, step: int, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if any(s >= step for s, _ in losses(run)):
                return
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


# ---- 1. exact resume after SIGKILL at a random step ------------------------------------
def kill_step(lo: int = 5, hi: int = 21) -> tuple[int, str]:
    """A random step in [lo, hi] and how to replay it: the seed comes from LMTK_KILL_SEED when
    set (replaying a failure), else a fresh one; both end up in the assertion messages."""
    seed = int(os.environ.get("LMTK_KILL_SEED") or random.randrange(2**32))
    step = random.Random(seed).randint(lo, hi)
    return step, f"killed at step {step} (replay: LMTK_KILL_SEED={seed})"


def test_kill_step_replays_from_its_seed(monkeypatch):
    monkeypatch.setenv("LMTK_KILL_SEED", "1234")
    assert kill_step() == kill_step() and "LMTK_KILL_SEED=1234" in kill_step()[1]
    monkeypatch.delenv("LMTK_KILL_SEED")
    assert len({kill_step()[0] for _ in range(50)}) > 1  # and random without it


def test_sigkill_at_random_step_then_resume_equals_uninterrupted(env):
    runs, e = env
    args = TINY + ["budget.steps=24", "checkpoint.every=4", "checkpoint.keep=2"]
    straight = lmtk(["train", *args, "run.name=straight"], e)
    assert straight.returncode == 0, straight.stderr
    kill_at, replay = kill_step()
    print(replay)
    proc = subprocess.Popen([sys.executable, "-m", "lmtk", "train", *args, "run.name=killed"], env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(runs / "killed", kill_at, proc)
    except AssertionError as err:
        raise AssertionError(f"{replay}: {err}") from None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((runs / "killed" / "run.json").read_text())["status"] == "running", replay  # a real crash
    resumed = lmtk(["train", *args, "run.name=killed", "resume=auto"], e)
    assert resumed.returncode == 0, f"{replay}\n{resumed.stderr}"
    assert "resumed from" in resumed.stderr, replay
    assert losses(runs / "killed") == losses(runs / "straight"), replay  # same history, no duplicate rows
    assert same_weights(runs / "killed/checkpoints/final", runs / "straight/checkpoints/final"), replay
    assert json.loads((runs / "killed" / "run.json").read_text())["status"] == "done", replay


# ---- 2. atomic checkpoints ---------------------------------------------------------------
def test_kill_inside_save_leaves_previous_checkpoint_usable(env, tmp_path):
    runs, e = env
    driver = tmp_path / "driver.py"
    # Kill the process while the second checkpoint is being written (after its weights, before its state).
    driver.write_text(textwrap.dedent("""
        import os, signal, sys, torch
        calls = {"n": 0}
        real = torch.save
        def dying_save(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        torch.save = dying_save
        from lmtk.cli import main
        sys.argv = ["lmtk"] + sys.argv[1:]
        main()
    """))
    args = TINY + ["budget.steps=12", "checkpoint.every=4", "run.name=r"]
    p = subprocess.run([sys.executable, str(driver), "train", *args], env=e, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL
    ckpts = runs / "r" / "checkpoints"
    assert any(d.name.startswith(".tmp-step-000008") for d in ckpts.iterdir())  # the torn save
    assert RunDir(runs / "r").latest_checkpoint().name == "step-000004"
    ok = lmtk(["train", *args, "resume=auto"], e)
    assert ok.returncode == 0, ok.stderr
    assert "resumed from" in ok.stderr and "step-000004" in ok.stderr


def test_checkpoint_rotation_keeps_n(env):
    runs, _ = env
    train_inproc("rot", ["budget.steps=10", "checkpoint.every=2", "checkpoint.keep=2"])
    names = sorted(p.name for p in (runs / "rot" / "checkpoints").iterdir())
    assert names == ["final", "step-000006", "step-000008"]


# ---- 3. clean interrupts -----------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_exits(env, sig, code):
    runs, e = env
    proc = subprocess.Popen([sys.executable, "-m", "lmtk", "train", *TINY, "budget.steps=100000", "run.name=s"],
                            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(runs / "s", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    last = err.strip().splitlines()[-1]
    assert "resume=auto" in last and "run.name=s" in last
    assert json.loads((runs / "s" / "run.json").read_text())["status"] == "interrupted"
    ckpt = RunDir(runs / "s").latest_checkpoint()
    assert ckpt is not None and (ckpt / "meta.json").is_file()
    assert not (runs / "s" / ".lock").exists()


def test_second_ctrl_c_exits_at_once(env):
    runs, e = env
    proc = subprocess.Popen([sys.executable, "-m", "lmtk", "train", *TINY, "budget.steps=100000", "run.name=s2",
                             # long optimizer steps (16 micro-batches) so the second signal lands mid-step
                             "model.d_model=128", "data.seq_len=256", "train.batch_size=64", "train.micro_batch_size=4"],
                            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(runs / "s2", 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # same-signal deliveries coalesce if sent back to back
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "second Ctrl-C" in err
    assert "Traceback" not in err
    assert json.loads((runs / "s2" / "run.json").read_text())["status"] == "interrupted"


# ---- 4. numerical guards -----------------------------------------------------------------
def _poison(monkeypatch, bad_steps):
    """Make the CLM loss NaN on the given optimizer steps (counted by calls to loss)."""
    from lmtk.objectives import CLM

    real = CLM.loss
    calls = {"n": 0}

    def loss(self, model, batch, gen, frac=0.0):
        out, m = real(self, model, batch, gen, frac)
        step = calls["n"] // 2  # two micro-batches per step
        calls["n"] += 1
        return (out * float("nan") if step in bad_steps else out), m

    monkeypatch.setattr(CLM, "loss", loss)


def test_nonfinite_steps_are_skipped_and_counted(env, monkeypatch):
    runs, _ = env
    _poison(monkeypatch, {3, 4})
    summary = train_inproc("nan", ["budget.steps=8"])
    assert summary["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in weights(runs / "nan/checkpoints/final").values())


def test_too_many_bad_steps_stop_with_clear_error(env, monkeypatch):
    runs, _ = env
    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row \(last at step 7\)"):
        train_inproc("div", ["budget.steps=50", "checkpoint.every=2", "guard.max_bad_steps=3"])
    run = RunDir(runs / "div")
    assert run.info()["status"] == "failed"
    good = run.latest_checkpoint()
    assert all(torch.isfinite(t).all() for t in weights(good).values())


# ---- 5. locks ------------------------------------------------------------------------------
def test_live_lock_refuses_stale_lock_is_taken_over(env):
    runs, e = env
    (runs / "busy").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs / "busy" / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(UserError, match=f"in use by process {sleeper.pid}"):
            RunDir(runs / "busy").lock()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match="stale lock"):
        r = RunDir(runs / "busy")
        r.lock()
    assert (runs / "busy" / ".lock").read_text() == str(os.getpid())
    r.unlock()


# ---- 6. safe loading -----------------------------------------------------------------------
def _finished_run(env, name):
    runs, e = env
    p = lmtk(["train", *TINY, "budget.steps=4", "checkpoint.every=2", "checkpoint.keep=5", f"run.name={name}"], e)
    assert p.returncode == 0, p.stderr
    return runs / name


def test_corrupted_weights_are_a_clear_error(env):
    runs, e = env
    run = _finished_run(env, "c")
    f = run / "checkpoints/step-000002/model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    p = lmtk(["train", *TINY, "budget.steps=4", "resume=" + str(f.parent), "run.name=c2"], e)
    assert p.returncode == 2
    assert "corrupted (checksum mismatch)" in p.stderr and "Traceback" not in p.stderr


def test_pickled_code_in_state_cannot_execute(env, tmp_path):
    runs, e = env
    run = _finished_run(env, "p")
    ckpt = run / "checkpoints/step-000002"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"train": Evil()}, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    import hashlib

    meta["checksums"]["state.pt"] = hashlib.sha256((ckpt / "state.pt").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    p = lmtk(["train", *TINY, "budget.steps=4", "resume=" + str(ckpt), "run.name=p2"], e)
    assert p.returncode == 2 and "cannot load trainer state" in p.stderr
    assert not marker.exists()


def test_fp16_scaler_calibration_is_not_divergence(env, monkeypatch):
    """Under fp16 the GradScaler starts high and halves its scale on every overflowing step:
    those skipped steps are calibration, not a diverging run, and must not count toward
    guard.max_bad_steps. (A scale of 2^127 overflows the scaled loss for a few steps.)"""
    real = torch.amp.GradScaler

    class HighScaler(real):
        def __init__(self, device="cuda", **kw):
            super().__init__(device, init_scale=2.0**127, **kw)

    monkeypatch.setattr(torch.amp, "GradScaler", HighScaler)
    summary = train_inproc("fp16", ["budget.steps=8", "precision=fp16", "device=cpu", "guard.max_bad_steps=2"])
    assert summary["steps"] == 8 and math.isfinite(summary["train_loss"])


def test_peak_memory_reads_ru_maxrss_in_the_platform_unit(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS."""
    import resource
    import types

    from lmtk.train import loop

    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=2**30))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert loop.peak_memory_gib(torch.device("cpu")) == 1.0
    monkeypatch.setattr(sys, "platform", "linux")
    assert loop.peak_memory_gib(torch.device("cpu")) == 1024.0
