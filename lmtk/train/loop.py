"""The one training loop, shared by every command.

Each optimizer step: lr from the budget fraction -> micro-batches (objective.loss plus the
model's auxiliary losses, backward) -> clip -> guard against non-finite values -> step.
Every N steps: log, validate, checkpoint. The loop never branches on the objective; it only asks it for a
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
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lmtk.device import autocast, peak_tflops
from lmtk.errors import UserError
from lmtk.eval.lm import val_seed, validate  # validation lives in lmtk.eval
from lmtk.models.auxloss import collect as collect_aux
from lmtk.train.budget import Budget, TrainState, micro_steps
from lmtk.train.optim import build_optimizer, set_lr, step_unless
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
    """What the loop needs; built by the command (train, finetune, later distill).

    train_data.get(sample, count) gives a batch: a tensor of token windows (pretraining) or a
    dict of tensors (labelled, padded batches: input_ids, attention_mask, labels); either way
    the data position is one integer. An objective with count(batch) has its micro-batches
    weighted by that count (examples, tokens) rather than equally. `validate(model) -> metrics`
    replaces the language-model validation (a task's metric, per epoch with val.every)."""

    cfg: Any
    model: torch.nn.Module
    objective: Any
    train_data: Any  # Batches, or any source with .n (windows per epoch) and .get(start, count, pin) -> a batch with .to()
    val_data: Any  # Batches or None
    val_objectives: dict  # name -> objective, reported as val/<name>_loss and _bpb
    run: Any  # RunDir
    sinks: Any
    device: torch.device
    dtype: torch.dtype
    model_meta: dict = field(default_factory=dict)
    resume_from: Any = None  # checkpoint directory or None
    dist: Any = None  # lmtk.dist.Dist; None: single process
    tokenizer_json: str = ""  # saved into every checkpoint, so it stands alone
    data_meta: dict = field(default_factory=dict)  # token counts of the data, checked on resume
    scaler: Any = None  # set by fit: the GradScaler under fp16
    validate: Any = None  # callable(model) -> {"val/...": value}; None: lm_metrics on val_data
    meta: dict = field(default_factory=dict)  # more keys for every checkpoint's meta.json (finetune: peft, task, head)
    seq_len: Any = None  # tokens per sample for FLOPs (None: data.seq_len)
    checkpoints: bool = True  # False: train and return, writing nothing (an eval suite's training on synthetic data)
    # callable(budget fraction) -> LR factor; None: the schedule over the whole budget (distillation
    # restarts it at each stage)
    lr_factor: Any = None


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
    """Validation: lmtk.eval.lm.validate on the job's val data (the same numbers `lmtk eval
    suite=ppl` reports)."""
    # Rank 0 validates alone, except under FSDP: there every forward is a collective (the
    # all-gathers), so all ranks run the same batches and get the same numbers.
    if job.dist is not None and not job.dist.main and not job.dist.fsdp:
        return {}
    if job.validate is not None:
        return job.validate(model or job.model)
    if job.val_data is None:
        return {}
    return validate(model or job.model, job.val_objectives, job.val_data, main=job.objective.val_key,
                    tokens=job.cfg.val.tokens, batch_size=job.cfg.train.micro_batch_size, device=job.device,
                    dtype=job.dtype, seed=val_seed(job.cfg))


class _Signals:
    """First Ctrl-C / SIGTERM: finish the step and checkpoint. Second: exit at once (rank 0
    marks the run interrupted and releases its lock first). Only rank 0 speaks. Under a
    hand-run torchrun a repeat within a second is the same Ctrl-C delivered twice (torchrun
    forwards the terminal's SIGINT to workers that already got it), not a second one."""

    # torchrun sets TORCHELASTIC_RUN_ID; lmtk's own launcher passes each signal on once.
    REPEAT_S = 1.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    def __init__(self, job: Job, main: bool = True):
        self.signum = None
        self.previous = {}
        self.job, self.main = job, main
        self.first_at = 0.0

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
            if self.main:
                then = " to write a checkpoint" if self.job.checkpoints else ""
                print(f"stopping after this step{then} (signal again to exit at once)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self.first_at < self.REPEAT_S:  # the same Ctrl-C, forwarded by torchrun
            return
        try:
            if self.main:
                print("interrupted (second Ctrl-C): stopped at once, without a checkpoint", file=sys.stderr, flush=True)
            if self.job.run is not None:
                self.job.run.finish("interrupted")
                self.job.run.unlock()
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

    def hidden(self, idx, causal: bool = True, attention_mask=None):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        if self.ddp is None:
            return self.model.hidden(idx, causal, **kw)
        return self.ddp(idx, causal=causal, head=False, **kw)

    def __call__(self, *args, **kw):
        """The model's forward (a task model's: logits of the classes), through DDP when data-parallel."""
        return (self.model if self.ddp is None else self.ddp)(*args, **kw)

    def align(self, part: str, inputs: dict) -> dict:
        """The model's align() (layers run on given inputs: distillation's alignment stages),
        through DDP's forward when data-parallel."""
        if self.ddp is None:
            return self.model.align(part, inputs)
        return self.ddp(None, align=(part, inputs))

    def logits(self, h):
        return self.model.logits(h)

    @property
    def objective_heads(self):
        """The objective's own heads on the model (objective.attach): run on hidden()'s output."""
        return self.model.objective_heads

    def head_loss(self, h, targets, **kw):
        return self.model.head_loss(h, targets, **kw)

    def sync(self, last: bool):
        # FSDP reduce-scatters after every micro-batch: skipping it would hold full-size
        # gradients for the whole model until the last one, and memory is why FSDP was chosen.
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


class _Clock:
    """Training time: wall time with the pauses (validation, checkpoints) taken out, so a
    wall-clock budget buys the same training whatever the evaluation cadence. Data-parallel
    ranks agree on the slowest rank's time every step (agree())."""

    def __init__(self, seconds_before: float):
        self.before = seconds_before
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def agree(self, seconds: float) -> None:
        self.t0 = time.perf_counter() - (seconds - self.before)


def _prepare(job: Job, dist):
    """Model on the device (sharded under FSDP), optimizer, GradScaler, restored state, and
    the model as the objectives see it during training (DDP-wrapped when data-parallel)."""
    model, device, tc = job.model, job.device, job.cfg.train
    if job.resume_from is not None:
        from lmtk.checkpoint import load_weights

        load_weights(model, job.resume_from, objective_heads=True)  # into the whole model, before FSDP shards it
    if dist.fsdp:
        from lmtk.dist import shard

        shard(model, device, dist.world)  # also moves each rank's shard to the device
    else:
        model.to(device)
    model.train()
    model.activation_checkpointing = tc.activation_checkpointing
    opt = build_optimizer(model, job.cfg.optim, tc.lr, device)
    scaler = torch.amp.GradScaler(device.type) if job.dtype == torch.float16 else None
    state = _restore(job, opt, scaler) if job.resume_from is not None else TrainState()
    if job.resume_from is not None:
        job.sinks.console.message(f"resumed from {job.resume_from} at step {state.step}")
    if tc.compile:
        t0 = time.perf_counter()
        model.compile_blocks()
        job.sinks.console.message(f"torch.compile: blocks compiled lazily (set up in {time.perf_counter() - t0:.1f}s)")
    step_model = _StepModel(model)
    if dist.enabled and not dist.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # an objective whose steps train a part of the model (distillation's stages) leaves the
        # other parameters without gradients, which DDP must be told to expect
        partial = bool(getattr(job.objective, "partial_steps", False))
        step_model = _StepModel(model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                                           find_unused_parameters=partial))
    return opt, scaler, state, step_model


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def batch_tokens(batch) -> int:
    """Tokens in a batch (on the host): a window tensor's size, a padded batch's real tokens."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return batch.numel()


def _forward_backward(job: Job, step_model, state: TrainState, n_micro: int, frac: float, dist):
    """The step's micro-batches, gradients accumulated. Returns (this rank's mean loss, the
    objective's metrics, tokens this rank saw). An objective with count(batch) (examples,
    real tokens) weights each micro-batch's mean loss by its count over the step's total on
    all ranks, so the step's loss is the mean over examples, not a mean of means; without it
    every micro-batch weighs the same (pretraining's windows are all alike)."""
    mbs, world, seed = job.cfg.train.micro_batch_size, dist.world, job.cfg.seed
    step_loss = torch.zeros((), device=job.device)
    obj_metrics: dict = {}
    tokens = 0
    pin = job.device.type == "cuda"
    count = getattr(job.objective, "count", None)
    # Rank r takes the r-th slice of each global micro-batch and the same seed a single process
    # would use for it: N ranks == one process accumulating N.
    fetch = lambda micro: job.train_data.get(state.samples + (micro * world + dist.rank) * mbs, mbs, pin=pin)
    batches = counts = total = None
    if count is not None:  # the counts of the whole step first: each micro-batch's weight needs their total
        batches = [fetch(m) for m in range(n_micro)]
        counts = [float(count(b)) for b in batches]
        total = torch.tensor(sum(counts), dtype=torch.float64)
        if dist.enabled:
            total = total.to(job.device)
            dist.all_reduce_(total)
        total = max(float(total), 1e-12)
    try:
        for micro in range(n_micro):
            batch = batches[micro] if batches is not None else fetch(0)
            tokens += batch_tokens(batch)
            batch = _to_device(batch, job.device)
            gen = torch.Generator(job.device).manual_seed(step_seed(seed, state.step, micro * world + dist.rank))
            with step_model.sync(micro == n_micro - 1):
                # the model's auxiliary losses (an MoE's balance loss, models/auxloss.py) join every
                # objective's loss here; the logged loss stays the objective's
                with autocast(job.device, job.dtype), collect_aux(step_model.model) as aux:  # forward only: backward runs in the forward's dtypes
                    loss, obj_metrics = job.objective.loss(step_model, batch, gen, frac)
                extra = aux.total()
                if aux.terms:
                    obj_metrics = {**obj_metrics, **aux.metrics()}
                train_loss = loss if extra is None else loss + extra
                # DDP averages gradients over ranks, hence x world for count weights
                scaled = train_loss / n_micro if counts is None else train_loss * (counts[micro] * world / total)
                (job.scaler.scale(scaled) if job.scaler else scaled).backward()
            step_loss += loss.detach().float() / (n_micro * world) if counts is None else loss.detach().float() * (counts[micro] / total)
            if batches is None:
                state.samples += mbs * world
        if batches is not None:
            state.samples += n_micro * mbs * world
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory at train.micro_batch_size={mbs}; lower it (e.g. train.micro_batch_size={max(1, mbs // 2)}) "
            "-- train.batch_size stays the same through gradient accumulation"
        ) from None
    return step_loss, obj_metrics, tokens


def _agree(dist, step_loss: torch.Tensor, requested: int, clock: _Clock) -> int:
    """Data-parallel ranks agree on the step's loss, on stopping (any rank's signal stops them
    all at this same step) and on the clock (the slowest rank's). Returns the agreed signal."""
    if not dist.enabled:
        return requested
    dist.all_reduce_(step_loss)
    flags = torch.tensor([float(requested), clock.seconds()], device=step_loss.device)
    dist.all_reduce_(flags, "max")
    clock.agree(float(flags[1]))
    return int(flags[0].item())


def _optimizer_step(job: Job, opt, step_loss: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
    """Apply the step unless the loss or gradient is non-finite; decided on the device on a GPU
    (fused AdamW reads found_inf; the GradScaler does the same for fp16), on the host on a CPU. Returns whether the step
    counts against guard.max_bad_steps: under fp16 only a non-finite loss does, since
    gradient overflows are how the GradScaler calibrates its scale."""
    bad = ~torch.isfinite(step_loss + gnorm)
    if job.scaler:
        job.scaler.step(opt)
        job.scaler.update()
        bad = ~torch.isfinite(step_loss)
    else:
        step_unless(opt, bad)  # fused AdamW (GPU): found_inf on the device; foreach (CPU): on the host
    opt.zero_grad(set_to_none=True)
    return bad


class _Meter:
    """Mean training loss and tokens/s between log lines (device tensors: no host sync per step)."""

    def __init__(self, device, state: TrainState, clock: _Clock):
        self.loss_sum = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.tokens, self.seconds = state.tokens, clock.seconds()

    def add(self, step_loss: torch.Tensor, bad: torch.Tensor) -> None:
        self.loss_sum += torch.where(bad, 0.0, step_loss)
        self.count += (~bad).float()

    def read(self, state: TrainState, clock: _Clock) -> tuple[float, float]:
        """(mean loss, tokens/s) since the last read; resets."""
        now = clock.seconds()
        loss = (self.loss_sum / self.count).item() if self.count.item() else float("nan")
        tok_s = (state.tokens - self.tokens) / max(1e-9, now - self.seconds)
        self.loss_sum.zero_()
        self.count.zero_()
        self.tokens, self.seconds = state.tokens, now
        return loss, tok_s


def _plain(node):
    """A config section as a plain object (its dataclass, or a namespace): attribute reads at
    Python speed in the step loop."""
    obj = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
    return SimpleNamespace(**obj) if isinstance(obj, dict) else obj


def fit(job: Job) -> dict:
    """Train until the budget is spent (or a signal stops it); returns the run's summary."""
    from lmtk.dist import Dist

    cfg, sinks, device = job.cfg, job.sinks, job.device
    # the knobs read every step, as plain values: an OmegaConf read costs ~10 us, ~0.5 ms a step in all
    tc, schedule = _plain(cfg.train), _plain(cfg.schedule)
    log_every, ckpt_every, val_every = cfg.logger.every, cfg.checkpoint.every, cfg.val.every
    dist = job.dist or Dist()
    opt, job.scaler, state, step_model = _prepare(job, dist)
    budget = Budget(_plain(cfg.budget), job.train_data.n)
    clock = _Clock(state.seconds)
    meter = _Meter(device, state, clock)
    guard = _Guard(state, cfg.guard.max_bad_steps, device)
    peak = peak_tflops(device, tc.peak_tflops)
    world, L = dist.world, job.seq_len or cfg.data.seq_len
    flops_tok = job.model.flops_per_token(L, job.objective.head_fraction)
    metrics: dict = {}
    val_metrics: dict = {}
    stop = 0

    if state.step == 0 and cfg.val.at_start:
        _validate(job, clock, state.step, dist)
    with _Signals(job, main=dist.main) as sig:
        while budget.fraction(state) < 1.0 and not stop:
            frac = budget.fraction(state)
            lr = tc.lr * (job.lr_factor(frac) if job.lr_factor is not None else lr_factor(schedule, frac))
            set_lr(opt, lr)  # x each group's lr_scale (a task head's)
            n_micro = micro_steps(tc, frac, world)
            step_loss, obj_metrics, step_tokens = _forward_backward(job, step_model, state, n_micro, frac, dist)
            if job.scaler:
                job.scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(job.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            if dist.fsdp:  # a DTensor: the norm over all shards, the same on every rank
                gnorm = gnorm.full_tensor()
            stop = _agree(dist, step_loss, sig.signum or 0, clock)  # every rank acts on the agreed value
            bad = _optimizer_step(job, opt, step_loss, gnorm)
            guard.update(bad)
            meter.add(step_loss, bad)
            state.step += 1
            state.tokens += step_tokens * world  # pretraining: n_micro x micro_batch_size x world x seq_len
            state.seconds = clock.seconds()

            done = budget.fraction(state) >= 1.0
            log_now = state.step % log_every == 0 or done
            ckpt_now = bool(ckpt_every) and state.step % ckpt_every == 0 and not done
            if log_now or ckpt_now:
                guard.check(state)  # host sync: only on log and checkpoint steps
            if log_now:
                loss, tok_s = meter.read(state, clock)
                f = budget.fraction(state)
                metrics = {
                    "loss": loss, "lr": lr, "grad_norm": float(gnorm), "tok/s": tok_s, "tokens": state.tokens,
                    "batch": n_micro * tc.micro_batch_size * world, "frac": f, "skipped": state.skipped_steps,
                    **{k: float(v) if torch.is_tensor(v) else v for k, v in obj_metrics.items()},  # read here only
                    **({"mfu": flops_tok * tok_s / (peak * 1e12)} if peak else {}),
                }
                sinks.log(metrics, state.step)
                eta = state.seconds * max(0.0, 1 - f) / f if f > 0 else float("nan")  # the last step may pass 100%
                sinks.console.progress_update(f, eta, metrics, state.step)
            if val_every and state.step % val_every == 0 and not done:
                val_metrics = _validate(job, clock, state.step, dist)
            if ckpt_now and not stop:
                with clock.paused():
                    save(job, f"step-{state.step:06d}", opt, state)

    guard.check(state)
    if stop:
        path = save(job, f"step-{state.step:06d}", opt, state)
        name = "SIGINT" if stop == signal.SIGINT else "SIGTERM"
        if not job.checkpoints:
            raise Interrupted(stop, f"{name}: stopped at step {state.step} (this training keeps no checkpoints)")
        raise Interrupted(stop, f"{name}: stopped at step {state.step}, checkpoint {path}; "
                                f"continue with resume=auto run.name={cfg.run.name}")
    val_metrics = _validate(job, clock, state.step, dist) or val_metrics
    save(job, "final", opt, state, rotate=False)
    summary = {
        "steps": state.step, "tokens": state.tokens, "tok/s": state.tokens / max(1e-9, state.seconds),
        "train_seconds": state.seconds, "peak_mem_gib": peak_memory_gib(device), "train_loss": metrics.get("loss"),
        "skipped_steps": state.skipped_steps, **val_metrics,
    }
    if peak:
        summary["mfu"] = flops_tok * summary["tok/s"] / (peak * 1e12)
    return summary


def _validate(job: Job, clock: _Clock, step: int, dist) -> dict:
    """Validation outside the training clock. Data-parallel ranks wait for rank 0 in a
    barrier, paused too: waiting inside the next step's all-reduce would count it as training."""
    with clock.paused():
        metrics = evaluate(job)
        if metrics:
            job.sinks.log(metrics, step)
        dist.barrier()
    return metrics


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def save(job: Job, tag: str, opt, state: TrainState, rotate: bool = True) -> os.PathLike | None:
    """Rank 0 writes the checkpoint; the other ranks wait for it. Nothing for a job with
    checkpoints=False."""
    from omegaconf import OmegaConf

    if not job.checkpoints:
        return None
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
        "scaler": job.scaler.state_dict() if job.scaler else {},
        "rng": _rng_state(),
    }
    meta = {
        "tag": tag, "step": state.step, "tokens": state.tokens, "model": job.model_meta,
        "objective": {"name": job.objective.name, "masked_shift": job.objective.masked_shift},
        "data": job.data_meta, **job.meta,
    }
    path = job.run.save_checkpoint(
        tag, job.model, payload, meta, tokenizer=job.tokenizer_json, config=OmegaConf.to_yaml(job.cfg, resolve=True),
        keep=job.cfg.checkpoint.keep if rotate else None, weights=weights,
    )
    if job.dist is not None:
        job.dist.barrier()
    return path


def _restore(job: Job, opt, scaler) -> TrainState:
    """Optimizer, scaler, RNG and progress from a checkpoint already checked by check_resume
    (fit loaded the weights, before sharding)."""
    from lmtk.checkpoint import load_state

    payload = load_state(job.resume_from)
    if job.dist is not None and job.dist.fsdp:
        from lmtk.dist import load_optimizer

        load_optimizer(job.model, opt, payload["optimizer"])
    else:
        opt.load_state_dict(payload["optimizer"])
    if scaler and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"])
    return TrainState(**payload["train"])
