"""Data parallelism: 2 gloo processes under torchrun (DDP or FSDP2) == 1 process with the same
global batch. Micro-batches of 2 in a batch of 8: each rank accumulates 2, so the skipped
gradient sync on non-final micro-batches is exercised too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ARGS = [
    "budget.hours=null", "budget.steps=6", "data.max_chars=300000", "tokenizer.vocab_size=512",
    "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "data.seq_len=32", "train.batch_size=8",
    "train.micro_batch_size=2", "logger.every=1", "val.tokens=2048", "objective=mlm", "checkpoint.every=3",
    # scaled sinusoidal positions (crammed BERT's): a learned scale parameter FSDP must shard too
    "model.positions=sinusoidal",
]


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) < tol for x, y in zip(a, b))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(runs root, env) with the single-process reference run 'single' already trained."""
    base = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, LMTK_RUNS=str(base / "runs"), LMTK_CACHE=str(base / "cache"), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "lmtk", "train", *ARGS, "run.name=single"], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    return base / "runs", env


def _torchrun(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "lmtk", "train", *ARGS, *args],
        env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def fsdp_run(world):
    runs, env = world
    p = _torchrun(env, "launcher.strategy=fsdp", "run.name=fsdp")
    assert p.returncode == 0, p.stderr[-3000:]
    return runs / "fsdp"


def test_two_gloo_ranks_equal_one_process(world):
    runs, env = world
    ddp = _torchrun(env, "run.name=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _losses(runs / "single"), _losses(runs / "ddp")
    assert len(a) == 6 and _close(a, b), (a, b)
    wa, wb = load_file(runs / "single/checkpoints/final/model.safetensors"), load_file(runs / "ddp/checkpoints/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # rank 0 alone wrote the run: one writer's metrics (6 steps, not 12)
    info = json.loads((runs / "ddp" / "run.json").read_text())
    assert info["status"] == "done" and "x 2 ranks" in info["device"]
    assert sorted(p.name for p in (runs / "ddp" / "checkpoints").iterdir()) == ["final", "step-000003"]


def test_rts_with_an_untied_head_trains_under_ddp(world):
    """objective=rts without its LM loss leaves the untied head without gradients: DDP is told so
    (the objective's partial_steps), where it failed at step 2 waiting for them."""
    runs, env = world
    p = _torchrun(env, "run.name=rts", "objective=rts", "model.tie_embeddings=false", "budget.steps=3", "checkpoint.every=0")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(_losses(runs / "rts")) == 3


def test_fsdp_two_ranks_equal_one_process(world, fsdp_run):
    runs, _ = world
    a, b = _losses(runs / "single"), _losses(fsdp_run)
    assert len(a) == 6 and _close(a, b), (a, b)
    info = json.loads((fsdp_run / "run.json").read_text())
    assert info["status"] == "done" and "x 2 ranks, fsdp" in info["device"]
    assert sorted(p.name for p in (fsdp_run / "checkpoints").iterdir()) == ["final", "step-000003"]
    # the checkpoint is the single-process one: full weights, the tied head stored once,
    # and the optimizer state in opt.state_dict()'s index-keyed layout
    fa, fb = runs / "single/checkpoints/final", fsdp_run / "checkpoints/final"
    wa, wb = load_file(fa / "model.safetensors"), load_file(fb / "model.safetensors")
    assert sorted(wa) == sorted(wb) and "head.weight" not in wb
    assert all(wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    with safe_open(fa / "model.safetensors", "pt") as x, safe_open(fb / "model.safetensors", "pt") as y:
        assert x.metadata() == y.metadata()
    oa = torch.load(fa / "state.pt", weights_only=True)["optimizer"]
    ob = torch.load(fb / "state.pt", weights_only=True)["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and sorted(oa["state"]) == sorted(ob["state"])
    assert all(torch.allclose(oa["state"][i][k], ob["state"][i][k], atol=1e-5) for i in oa["state"] for k in oa["state"][i])
    # and it loads in one process without torch.distributed
    from lmtk.checkpoint import load_pretrained

    model, _, meta = load_pretrained(fsdp_run)
    assert meta["step"] == 6 and model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight.detach(), wb["embed.weight"])
    # a single process resumes the FSDP run's step-3 checkpoint exactly
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", *ARGS, f"resume={fsdp_run}/checkpoints/step-000003",
                        "run.name=fsdp-then-single"], env=world[1], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _close(_losses(runs / "fsdp-then-single"), a[3:]), (_losses(runs / "fsdp-then-single"), a)  # a new run logs steps 4-6


def test_fsdp_resume(world, fsdp_run):
    """Two FSDP ranks resume their own step-3 checkpoint (sharding the saved optimizer state
    again) and replay steps 4-6 of the uninterrupted run."""
    runs, env = world
    p = _torchrun(env, "launcher.strategy=fsdp", f"resume={fsdp_run}/checkpoints/step-000003", "run.name=fsdp-resumed")
    assert p.returncode == 0, p.stderr[-3000:]
    resumed, whole = _losses(runs / "fsdp-resumed"), _losses(fsdp_run)
    assert _close(resumed, whole[3:]), (resumed, whole)  # a new run: it logs steps 4-6 only
    wa, wb = load_file(fsdp_run / "checkpoints/final/model.safetensors"), load_file(runs / "fsdp-resumed/checkpoints/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# Rank 1 alone gets a NaN loss on both micro-batches of step 2: the ranks must still agree to skip it.
_POISON = """
import os, sys
from lmtk.cli import main
from lmtk.objectives import MLM
real, calls = MLM.loss, [0]
def loss(self, *a, **k):
    out, m = real(self, *a, **k)
    calls[0] += 1
    bad = os.environ["RANK"] == "1" and (calls[0] - 1) // 2 == 1
    return (out * float("nan") if bad else out), m
MLM.loss = loss
sys.argv = ["lmtk", *sys.argv[1:]]
main()
"""


def test_fsdp_skips_a_non_finite_step_on_every_rank(world, fsdp_run):
    runs, env = world
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "--no-python", sys.executable, "-c", _POISON, "train", *ARGS,
         "launcher.strategy=fsdp", "run.name=fsdp-nan"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((runs / "fsdp-nan" / "run.json").read_text())
    assert info["status"] == "done" and info["summary"]["skipped_steps"] == 1
    assert _losses(runs / "fsdp-nan")[0] == _losses(fsdp_run)[0]
    assert all(torch.isfinite(t).all() for t in load_file(runs / "fsdp-nan/checkpoints/final/model.safetensors").values())
    # the skipped step did not reach AdamW: 3 steps, 2 updates
    state = torch.load(runs / "fsdp-nan/checkpoints/step-000003/state.pt", weights_only=True)["optimizer"]
    assert all(float(s["step"]) == 2 for s in state["state"].values())


def test_bad_strategy_is_one_line_error(world):
    _, env = world
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", "launcher.strategy=zero3"], env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: launcher.strategy=zero3 is not one of: ddp, fsdp"], p.stderr


def test_fsdp_refuses_fp16(world):
    """fp16's GradScaler would look for non-finite gradients shard by shard; refused before any work."""
    runs, env = world
    p = _torchrun(env, "launcher.strategy=fsdp", "precision=fp16", "run.name=fsdp-fp16")
    assert p.returncode != 0
    assert "error: precision=fp16 does not work with launcher.strategy=fsdp; use precision=bf16 (or fp32)" in p.stderr
    assert "/lmtk/" not in p.stderr  # no traceback from lmtk (torchrun prints its own for any failed worker)
    assert not (runs / "fsdp-fp16").exists()


def test_launcher_checks_settings_before_starting_any_rank(tmp_path):
    env = dict(os.environ, LMTK_RUNS=str(tmp_path / "runs"), LMTK_CACHE=str(tmp_path / "cache"))
    for args, expect in [
        (["launcher.strategy=fsdp", "precision=fp16", "device=cpu"], "error: precision=fp16 does not work with launcher.strategy=fsdp"),
        (["train.batch_size=6", "train.micro_batch_size=2", "device=cpu"], "error: train.batch_size=6 is not a multiple of train.micro_batch_size x ranks (2 x 4)"),
    ]:
        p = subprocess.run([sys.executable, "-m", "lmtk", "train", "launcher.nproc=4", *args], env=env, capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.strip().startswith(expect), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1  # one line: no rank ever started
    assert not (tmp_path / "runs").exists()


def test_global_batch_below_one_micro_batch_per_rank_lowers_the_micro_batch():
    from lmtk.config import compose
    from lmtk.train.pretrain import check_parallel

    cfg = compose("default", ["train.batch_size=8", "train.micro_batch_size=8"])
    assert "8 -> 4" in check_parallel(cfg, 2, torch.float32) and cfg.train.micro_batch_size == 4
    cfg = compose("default", ["train.batch_size=8", "train.micro_batch_size=2"])
    assert check_parallel(cfg, 2, torch.float32) is None and cfg.train.micro_batch_size == 2


def _lmtk_processes(tag: str) -> list[int]:
    """pids of live processes whose command line carries `tag` (a unique run name)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if tag in cmd and "lmtk" in cmd:
                pids.append(int(d))
    return pids


def _start_nproc2(env, name, *extra):
    """`lmtk train launcher.nproc=2 ...` as a terminal would run it: a process group of its own,
    so os.killpg() is the terminal's Ctrl-C reaching every process in the foreground group."""
    args = [a for a in ARGS if not a.startswith(("budget.steps", "checkpoint.every"))]
    return subprocess.Popen(
        [sys.executable, "-m", "lmtk", "train", *args, "budget.steps=100000", "launcher.nproc=2", f"run.name={name}", *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for_steps(run, proc, n=2, timeout=180):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("no training progress")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_under_launcher_nproc_checkpoints_once_and_exits_130(world):
    """Ctrl-C to the whole process group: every rank finishes the same step, rank 0 writes the
    checkpoint, the run is interrupted and unlocked, a few lines and no traceback, exit 130,
    no process left; resume=auto then continues it under 2 ranks again."""
    import signal
    import time

    runs, env = world
    name = f"ctrlc-{os.getpid()}"
    proc = _start_nproc2(env, name)
    _wait_for_steps(runs / name, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Connection closed" not in err, err
    # after the acknowledgement: progress lines of the step(s) finishing (the ranks agree at the
    # end of a step, so the one under way may be followed by one more) and the result; nothing
    # from rank 1 or torch
    after = err.split("stopping after this step")[1].strip().splitlines()[1:]
    assert all(line.startswith(name) for line in after[:-1]) and len(after) <= 3, err
    assert after[-1].startswith("SIGINT: stopped at step"), err
    assert err.count("stopped at step") == 1 and "continue with resume=auto" in err, err
    info = json.loads((runs / name / "run.json").read_text())
    assert info["status"] == "interrupted" and not (runs / name / ".lock").exists()
    [ckpt] = [p for p in (runs / name / "checkpoints").iterdir() if p.name.startswith("step-")]
    step = int(ckpt.name[5:])
    time.sleep(0.5)
    assert _lmtk_processes(name) == []
    p = subprocess.run([sys.executable, "-m", "lmtk", "train", *[a for a in ARGS if not a.startswith(("budget.steps", "checkpoint.every"))],
                        f"budget.steps={step + 2}", "launcher.nproc=2", f"run.name={name}", "resume=auto"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((runs / name / "run.json").read_text())["summary"]["steps"] == step + 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_second_ctrl_c_under_launcher_nproc_stops_at_once(world):
    import signal
    import time

    runs, env = world
    name = f"ctrlc2-{os.getpid()}"
    # long steps (many micro-batches), so the second Ctrl-C lands while the first waits for the step
    proc = _start_nproc2(env, name, "model.d_model=128", "data.seq_len=128", "train.batch_size=128")
    _wait_for_steps(runs / name, proc, n=1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 15, err
    assert "Traceback" not in err and err.count("second Ctrl-C") == 1, err
    info = json.loads((runs / name / "run.json").read_text())
    assert info["status"] == "interrupted" and not (runs / name / ".lock").exists()
    time.sleep(0.5)
    assert _lmtk_processes(name) == []


def test_wall_clock_budget_excludes_validation_under_ddp(world):
    """Rank 1 waits while rank 0 validates; that wait must not count as training time, or a
    budget.hours run with frequent validation stops early."""
    runs, env = world
    args = [a for a in ARGS if not a.startswith(("budget.", "checkpoint.every", "val.tokens"))]
    p = subprocess.run(
        [sys.executable, "-m", "lmtk", "train", *args, "budget.hours=0.0006", "val.every=2", "val.tokens=65536",
         "launcher.nproc=2", "run.name=hours"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((runs / "hours" / "run.json").read_text())
    rows = [json.loads(l) for l in (runs / "hours" / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val/loss" in r]
    wall = rows[-1]["time"] - rows[0]["time"]
    train_s = info["summary"]["train_seconds"]
    assert 2.0 <= train_s < 2.0 + 1.0  # the budget: 0.0006 h = 2.16 s of training
    assert len(val_rows) >= 4 and wall > 1.5 * train_s, (wall, train_s, len(val_rows))
