"""Metric sinks behind one small interface: log(metrics, step) and close().

metrics.jsonl is always written; the console shows a rich progress bar on a terminal and
plain lines otherwise (CI, pipes); wandb is imported only when logger=wandb."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, highlight=False)


class JsonlSink:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self.f.write(json.dumps(row, default=float) + "\n")

    def close(self) -> None:
        self.f.close()


# objective metrics shown on the progress line too: distillation's per-layer alignment losses and KD parts
PROGRESS_PREFIXES = ("align/", "kd/")


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Work done of a known total, its rate and ETA, for long work outside the training loop
    (tokenising, scoring, each eval suite's cells): a transient status line on a terminal, a plain
    line every `every_s` otherwise (logs, CI), nothing for work done within `quiet_s`.
    `progress(n)` adds n units; `unit` and `scale` say how to show them (MB: "MB", 1e6)."""

    def __init__(self, title: str, total: float | None, unit: str = "", scale: float = 1.0,
                 quiet_s: float = 3.0, every_s: float = 30.0):
        self.title, self.total, self.unit, self.scale = title, total, unit, scale
        self.quiet_s, self.every_s = quiet_s, every_s
        self.done, self.t0, self.last, self.bar = 0.0, time.perf_counter(), 0.0, None

    def __enter__(self):
        return self

    def __call__(self, n: float = 1) -> None:
        self.done += n
        now = time.perf_counter() - self.t0
        if now < self.quiet_s:
            return
        rate = self.done / now
        left = f", ETA {_fmt_eta((self.total - self.done) / rate)}" if self.total and self.total > self.done and rate > 0 else ""
        of = f"/{self.total / self.scale:,.1f}" if self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.title}: {self.done / self.scale:,.1f}{of}{unit}, {rate / self.scale:.1f}{unit}/s{left}"
        if console.is_terminal:
            if self.bar is None:
                self.bar = console.status(text)
                self.bar.start()
            self.bar.update(text)
        elif now - self.last >= self.every_s:
            self.last = now
            console.print(text, markup=False)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


class ConsoleSink:
    """Progress bar with step, loss, lr, tok/s and ETA; the budget fraction drives the bar."""

    def __init__(self, title: str, every: int):
        self.title = title
        self.every = every
        self.live = console.is_terminal
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[stats]}"),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task(title, total=1.0, eta="?", stats="")
            self.progress.start()

    def progress_update(self, frac: float, eta_s: float, metrics: dict, step: int) -> None:
        stats = f"step {step}  " + "  ".join(
            f"{k} {_short(v)}" for k, v in metrics.items() if k in ("phase", "loss", "lr", "tok/s") or k.startswith(PROGRESS_PREFIXES)
        )
        if self.live:
            self.progress.update(self.task, completed=min(frac, 1.0), eta=_fmt_eta(eta_s), stats=stats)
        else:
            console.print(f"{self.title} {100 * min(frac, 1.0):5.1f}%  {stats}  ETA {_fmt_eta(eta_s)}")

    def log(self, metrics: dict, step: int) -> None:
        if any(k.startswith("val/") for k in metrics):
            vals = "  ".join(f"{k} {_short(v)}" for k, v in metrics.items() if k.startswith("val/"))
            console.print(f"[dim]step {step}[/dim]  {vals}")

    def message(self, text: str) -> None:
        console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class WandbSink:
    def __init__(self, cfg, run_name: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError:
            from lmtk.errors import UserError

            raise UserError("logger=wandb needs the wandb package: pip install 'lmtk[wandb]'") from None
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=run_name, config=config, mode=cfg.mode, dir=str(run_dir)
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _short(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:.2e}"
    return str(v)


class Sinks:
    """Fan-out to all sinks; the console sink also owns the progress bar."""

    def __init__(self, sinks: list, console_sink: ConsoleSink):
        self.sinks = sinks
        self.console = console_sink

    def log(self, metrics: dict, step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as err:  # a failing logger must not lose the run
                print(f"warning: closing {type(s).__name__} failed: {err}", file=sys.stderr)


def make_sinks(cfg, run_dir, title: str) -> Sinks:
    con = ConsoleSink(title, cfg.logger.every)
    sinks = [JsonlSink(run_dir.metrics_path), con]
    if cfg.logger.name == "wandb":
        from omegaconf import OmegaConf

        sinks.append(WandbSink(cfg.logger, run_dir.name, OmegaConf.to_container(cfg, resolve=True), run_dir.path))
    return Sinks(sinks, con)


class _Quiet:
    """The console of a non-zero data-parallel rank: says nothing."""

    def progress_update(self, *a, **k) -> None:
        pass

    def message(self, *a, **k) -> None:
        pass


def null_sinks() -> Sinks:
    return Sinks([], _Quiet())
