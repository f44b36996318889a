"""The one training loop, shared by every command.

Each optimizer step: lr from the budget fraction -> micro-batches (objective.loss,
backward) -> clip -> guard against non-finite values -> step. Every N steps: log,
validate, checkpoint. The loop never branches on the objective; it only asks it for a
loss. Randomness of step s comes from generators seeded by (seed, s), and the data
position is one integer, so a resumed run replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmtk.device import autocast, peak_tflops
from lmtk.errors import UserError
from lmtk.train.budget import Budget, TrainState, micro_steps
from lmtk.train.optim import build_optimizer
from lmtk.train.schedule import lr_factor


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was written; the CLI exits 130 / 143."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class Diverged(UserError):
    """Too many consecutive non-finite steps."""


@dataclass
class Job:
    """What the loop needs; built by the command (train, later finetune/distill)."""

    cfg: Any
    model: torch.nn.Module
    objective: Any
    train_data: Any  # Batches
    val_data: Any  # Batches or None
    val_objectives: dict  # name -> objective, reported as val/<name>_loss and _bpb
    token_bytes: np.ndarray
    run: Any  # RunDir
    sinks: Any
    device: torch.device
    dtype: torch.dtype
    model_meta: dict = field(default_factory=dict)
    resume_from: Any = None  # checkpoint directory or None
    dist: Any = None  # lmtk.dist.Dist; None: single process


def step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def evaluate(job: Job, model=None) -> dict:
    """val/<objective>_loss and _bpb on a fixed number of validation tokens, fixed masking seed
    (lmtk.eval.lm: the same numbers `lmtk eval` reports)."""
    from lmtk.eval.lm import lm_metrics

    # Rank 0 validates alone, except under FSDP: there every forward is a collective (the
    # all-gathers), so all ranks run the same batches and get the same numbers.
    if job.val_data is None or (job.dist is not None and not job.dist.main and not job.dist.fsdp):
        return {}
    m = lm_metrics(model or job.model, job.val_objectives, job.val_data, tokens=job.cfg.val.tokens,
                   batch_size=job.cfg.train.micro_batch_size, device=job.device, dtype=job.dtype,
                   seed=job.cfg.seed + 12345, token_bytes=job.token_bytes)
    out = {f"val/{k}": v for k, v in m.items()}
    main = job.objective.val_key
    if f"val/{main}_loss" in out:
        out["val/loss"], out["val/bpb"] = out[f"val/{main}_loss"], out[f"val/{main}_bpb"]
    return out


class _Signals:
    """First Ctrl-C / SIGTERM: finish the step and checkpoint. Second: exit at once."""

    def __init__(self, on_force=None):
        self.signum = None
        self.previous = {}
        self.on_force = on_force

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print("stopping after this step to write a checkpoint (signal again to exit at once)", file=sys.stderr)
            return
        print("interrupted (second Ctrl-C): stopped at once, without a checkpoint", file=sys.stderr, flush=True)
        try:
            if self.on_force:
                self.on_force()
        finally:
            os._exit(128 + signum)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class _Guard:
    """Counts skipped (non-finite) steps on the device; check() syncs them into the TrainState
    and stops the run after max_bad consecutive ones."""

    def __init__(self, state: TrainState, max_bad: int, device):
        self.skipped = torch.tensor(float(state.skipped_steps), device=device)
        self.streak = torch.tensor(float(state.bad_streak), device=device)
        self.max_bad = max_bad

    def update(self, bad: torch.Tensor) -> None:
        b = bad.float()
        self.skipped += b
        self.streak.mul_(b).add_(b)  # +1 while bad, reset to 0 by a good step

    def check(self, state: TrainState) -> None:
        state.skipped_steps, state.bad_streak = int(self.skipped.item()), int(self.streak.item())
        if state.bad_streak >= self.max_bad:
            raise Diverged(
                f"loss or gradient not finite for {state.bad_streak} steps in a row (last at step {state.step}); "
                "lower train.lr or raise train.grad_clip; the last good checkpoint is kept"
            )


class _StepModel:
    """What objectives see during training: hidden(), logits() and head_loss() of the model, with the
    hidden pass routed through DDP's forward when data-parallel (so its reducer is armed),
    and sync(False) skipping DDP's gradient all-reduce on all but the last micro-batch.
    A sharded (FSDP) model's hidden() runs its hooks itself."""

    def __init__(self, model, ddp=None):
        self.model, self.ddp = model, ddp

    def hidden(self, idx, causal: bool = True):
        if self.ddp is None:
            return self.model.hidden(idx, causal)
        return self.ddp(idx, causal=causal, head=False)

    def logits(self, h):
        return self.model.logits(h)

    def head_loss(self, h, targets, **kw):
        return self.model.head_loss(h, targets, **kw)

    def sync(self, last: bool):
        # FSDP reduce-scatters after every micro-batch: skipping it would hold full-size
        # gradients for the whole model until the last one, and memory is why FSDP was chosen.
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


def fit(job: Job) -> dict:
    from lmtk.dist import Dist

    cfg, model, run, sinks, device = job.cfg, job.model, job.run, job.sinks, job.device
    dist = job.dist or Dist()
    tc = cfg.train
    if job.resume_from is not None:
        from lmtk.runs import load_weights

        load_weights(model, job.resume_from)  # into the whole model, before FSDP shards it
    if dist.fsdp:
        from lmtk.dist import shard

        shard(model, device, dist.world)  # also moves each rank's shard to the device
    else:
        model.to(device)
    model.train()
    model.activation_checkpointing = tc.activation_checkpointing
    opt = build_optimizer(model, cfg.optim, tc.lr, device)
    scaler = torch.amp.GradScaler(device.type) if job.dtype == torch.float16 else None
    state = TrainState()
    if job.resume_from is not None:
        state = _restore(job, opt, scaler)
        sinks.console.message(f"resumed from {job.resume_from} at step {state.step}")
    if tc.compile:
        t0 = time.perf_counter()
        model.compile_blocks()
        sinks.console.message(f"torch.compile: blocks compiled lazily (set up in {time.perf_counter() - t0:.1f}s)")
    step_model = _StepModel(model)
    if dist.enabled and not dist.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_model = _StepModel(model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None))
    budget = Budget(cfg.budget, job.train_data.n)
    L = cfg.data.seq_len
    mbs = tc.micro_batch_size
    world = dist.world
    pin = device.type == "cuda"
    peak = peak_tflops(device, tc.peak_tflops)
    flops_tok = model.flops_per_token(L, job.objective.head_fraction)

    if state.step == 0 and cfg.val.at_start:
        sinks.log(evaluate(job), 0)

    last_log_t, last_log_tokens = time.perf_counter(), state.tokens
    loss_sum = torch.zeros((), device=device)
    loss_count = torch.zeros((), device=device)
    guard = _Guard(state, cfg.guard.max_bad_steps, device)
    last_metrics: dict = {}
    val_metrics: dict = {}
    t_resume = time.perf_counter()
    seconds_before = state.seconds
    stop = None

    def forced_exit():
        if run is not None:
            run.finish("interrupted")
            run.unlock()

    with _Signals(on_force=forced_exit) as sig:
        while budget.fraction(state) < 1.0:
            frac = budget.fraction(state)
            lr = tc.lr * lr_factor(cfg.schedule, frac)
            for g in opt.param_groups:
                g["lr"] = lr
            n_micro = micro_steps(tc, frac, world)
            step_loss = torch.zeros((), device=device)
            try:
                for micro in range(n_micro):
                    # Rank r takes the r-th slice of this global micro-batch and the same seed a
                    # single process would use for it: N ranks == one process accumulating N.
                    first = state.samples + dist.rank * mbs
                    batch = job.train_data.get(first, mbs, pin=pin).to(device, non_blocking=True)
                    gen = torch.Generator(device).manual_seed(step_seed(cfg.seed, state.step, micro * world + dist.rank))
                    with step_model.sync(micro == n_micro - 1):
                        with autocast(job.device, job.dtype):  # forward only: backward runs in the forward's dtypes
                            loss, obj_metrics = job.objective.loss(step_model, batch, gen, frac)
                        scaled = loss / n_micro
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss += loss.detach().float() / (n_micro * world)
                    state.samples += mbs * world
            except torch.OutOfMemoryError:
                raise UserError(
                    f"out of GPU memory at train.micro_batch_size={mbs}; lower it (e.g. train.micro_batch_size={max(1, mbs // 2)}) "
                    "-- train.batch_size stays the same through gradient accumulation"
                ) from None
            if scaler:
                scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            if dist.fsdp:  # a DTensor: the norm over all shards, the same on every rank
                gnorm = gnorm.full_tensor()
            if dist.enabled:  # every rank must agree on skipping, stopping and the clock
                dist.all_reduce_(step_loss)
                flags = torch.tensor([float(sig.signum or 0), time.perf_counter() - t_resume], device=device)
                dist.all_reduce_(flags, "max")
                if flags[0] > 0 and sig.signum is None:
                    sig.signum = int(flags[0].item())
                t_resume = time.perf_counter() - float(flags[1])
            # Non-finite loss or gradient: skip the update. Decided on the device (fused AdamW reads
            # found_inf; the GradScaler does the same for fp16), counted on the device, read on logging.
            bad = ~torch.isfinite(step_loss + gnorm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.found_inf = bad.float()
                opt.step()
                del opt.found_inf
            guard.update(bad)
            loss_sum += torch.where(bad, 0.0, step_loss)
            loss_count += (~bad).float()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += n_micro * mbs * world * L
            state.seconds = seconds_before + time.perf_counter() - t_resume

            done = budget.fraction(state) >= 1.0
            log_now = state.step % cfg.logger.every == 0 or done
            if log_now or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
                guard.check(state)  # host sync: only on log and checkpoint steps
            if log_now:
                now = time.perf_counter()
                tok_s = (state.tokens - last_log_tokens) / max(1e-9, now - last_log_t)
                last_metrics = {
                    "loss": (loss_sum / loss_count).item() if loss_count.item() else float("nan"),
                    "lr": lr,
                    "grad_norm": float(gnorm),
                    "tok/s": tok_s,
                    "tokens": state.tokens,
                    "batch": n_micro * mbs * world,
                    "frac": budget.fraction(state),
                    "skipped": state.skipped_steps,
                    **obj_metrics,
                    **({"mfu": flops_tok * tok_s / (peak * 1e12)} if peak else {}),
                }
                sinks.log(last_metrics, state.step)
                f = budget.fraction(state)
                eta = state.seconds * max(0.0, 1 - f) / f if f > 0 else float("nan")  # the last step may pass 100%
                sinks.console.progress_update(f, eta, last_metrics, state.step)
                loss_sum.zero_()
                loss_count.zero_()
                last_log_t, last_log_tokens = time.perf_counter(), state.tokens
            if cfg.val.every and state.step % cfg.val.every == 0 and not done:
                t_pause = time.perf_counter()
                val_metrics = evaluate(job)
                sinks.log(val_metrics, state.step)
                t_resume += time.perf_counter() - t_pause  # validation does not spend the budget
                last_log_t += time.perf_counter() - t_pause  # nor lower the logged tok/s
            if sig.signum is not None:
                stop = sig.signum
                break
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and not done:
                t_pause = time.perf_counter()
                save(job, f"step-{state.step:06d}", opt, scaler, state)
                t_resume += time.perf_counter() - t_pause
                last_log_t += time.perf_counter() - t_pause

    guard.check(state)
    if stop is not None:
        path = save(job, f"step-{state.step:06d}", opt, scaler, state)
        name = "SIGINT" if stop == signal.SIGINT else "SIGTERM"
        raise Interrupted(stop, f"{name}: stopped at step {state.step}, checkpoint {path}; continue with resume=auto run.name={run.name}")

    val_metrics = evaluate(job)
    if val_metrics:
        sinks.log(val_metrics, state.step)
    save(job, "final", opt, scaler, state, rotate=False)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "tok/s": state.tokens / max(1e-9, state.seconds),
        "train_seconds": state.seconds,
        "peak_mem_gib": peak_mem,
        "train_loss": last_metrics.get("loss"),
        "skipped_steps": state.skipped_steps,
        **{k: v for k, v in val_metrics.items()},
    }
    if peak:
        summary["mfu"] = flops_tok * summary["tok/s"] / (peak * 1e12)
    return summary


def save(job: Job, tag: str, opt, scaler, state: TrainState, rotate: bool = True) -> os.PathLike | None:
    """Rank 0 writes the checkpoint; the other ranks wait for it."""
    weights = optim = None
    if job.dist is not None and job.dist.fsdp:  # a collective: every rank gathers, rank 0 gets the full state
        from lmtk.dist import full_state

        weights, optim = full_state(job.model, opt)
    if job.dist is not None and not job.dist.main:
        job.dist.barrier()
        return None
    payload = {
        "train": state.to_dict(),
        "optimizer": optim if optim is not None else opt.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "rng": _rng_state(),
    }
    meta = {"tag": tag, "step": state.step, "tokens": state.tokens, "model": job.model_meta, "objective": job.objective.name}
    path = job.run.save_checkpoint(tag, job.model, payload, meta, keep=job.cfg.checkpoint.keep if rotate else None, weights=weights)
    if job.dist is not None:
        job.dist.barrier()
    return path


def check_resume(ckpt, model_meta: dict) -> int:
    """Verify a checkpoint's checksums and that it fits the configured model. Returns its step."""
    from lmtk.runs import verify_checkpoint

    meta = verify_checkpoint(ckpt)
    saved = meta.get("model", {})
    diff = sorted(k for k in set(saved) | set(model_meta) if saved.get(k) != model_meta.get(k))
    if diff:
        show = ", ".join(f"{k}: {saved.get(k)} -> {model_meta.get(k)}" for k in diff[:4])
        raise UserError(f"cannot resume from {ckpt}: the model config differs ({show}); resume with the checkpoint's model settings")
    return int(meta["step"])


def _restore(job: Job, opt, scaler) -> TrainState:
    """Optimizer, scaler, RNG and progress from a checkpoint already checked by check_resume
    (fit loaded the weights, before sharding)."""
    payload = _load_state(job.resume_from)
    if job.dist is not None and job.dist.fsdp:
        from lmtk.dist import load_optimizer

        load_optimizer(job.model, opt, payload["optimizer"])
    else:
        opt.load_state_dict(payload["optimizer"])
    if scaler and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"])
    return TrainState(**payload["train"])


def _load_state(ckpt):
    from lmtk.runs import load_state

    try:
        return load_state(ckpt)
    except Exception as err:
        raise UserError(f"cannot load trainer state of {ckpt}: {str(err).splitlines()[0]}") from None
