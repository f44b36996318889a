"""`lmtk plot`: a run's curves from metrics.jsonl as PNG files (matplotlib, the `plot` extra).

  train_loss.png  training loss (the mean between log lines)
  val.png         validation loss (a distillation's teacher dashed) | bits per byte (or a task's score)
  lr.png          learning rate
  tok_s.png       training tokens per second

One run: into <run>/plots/. Several runs: overlaid, one colour and one legend entry per run,
into the folder given with --out. The x-axis is the step, the tokens seen (validation rows,
which carry no token count, are placed by their step) or the wall time since the run's first
row. Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot state, no
display needed. `after_run` writes a finished run's plots when matplotlib is importable (and
LMTK_PLOTS is not 0: the test suite's setting) and never fails the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmtk.errors import UserError
from lmtk.runs import RunDir

AXES = ("step", "tokens", "time")
FILES = ("train_loss.png", "val.png", "lr.png", "tok_s.png")
SIZE = (8.0, 4.5)  # inches at DPI: 800 x 450 pixels (val.png: two panels, 1200 x 450)
WIDE = (12.0, 4.5)
DPI = 100
MARKERS_BELOW = 40  # series with fewer points get markers, so two validations are visible


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("lmtk plot needs matplotlib: pip install 'lmtk[plot]'") from None
    return matplotlib


class Series:
    """One run's metrics split into training rows and validation rows, with x values per axis."""

    def __init__(self, run: RunDir, label: str):
        self.run, self.label = run, label
        rows = run.metrics()
        self.train = [r for r in rows if "loss" in r and "step" in r]
        self.val = [r for r in rows if any(k.startswith("val/") for k in r) and "step" in r]
        times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
        self.t0 = min(times) if times else 0.0
        steps = [r["step"] for r in self.train if isinstance(r.get("tokens"), (int, float))]
        toks = [r["tokens"] for r in self.train if isinstance(r.get("tokens"), (int, float))]
        self._steps, self._tokens = [0, *steps], [0, *toks]

    def empty(self) -> bool:
        return not self.train and not self.val

    def x(self, rows: list[dict], axis: str, scale: float = 1.0) -> list[float]:
        if axis == "step":
            return [r["step"] for r in rows]
        if axis == "time":
            return [(r.get("time", self.t0) - self.t0) / scale for r in rows]
        import numpy as np  # tokens: validation rows by their step, between the training rows around them

        return [float(v) for v in np.interp([r["step"] for r in rows], self._steps, self._tokens)]

    def y(self, rows: list[dict], key: str) -> tuple[list[dict], list[float]]:
        keep = [r for r in rows if isinstance(r.get(key), (int, float))]
        return keep, [float(r[key]) for r in keep]

    def duration(self) -> float:
        return max([r.get("time", self.t0) - self.t0 for r in self.train + self.val] or [0.0])


def _time_unit(series: list[Series]) -> tuple[float, str]:
    longest = max([s.duration() for s in series] or [0.0])
    if longest < 180:
        return 1.0, "s"
    if longest < 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _xlabel(axis: str, unit: str) -> str:
    return {"step": "step", "tokens": "tokens seen", "time": f"wall time since the first row ({unit})"}[axis]


def _line(ax, s: Series, rows, key, axis, scale, color, label, **kw) -> bool:
    rows, ys = s.y(rows, key)
    if not ys:
        return False
    marker = "o" if len(ys) < MARKERS_BELOW else None
    ax.plot(s.x(rows, axis, scale), ys, color=color, label=label, marker=marker, markersize=3, linewidth=1.4, **kw)
    return True


def _finish(ax, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small", loc="best")
    if xlabel == "tokens seen":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)


def plot_runs(runs: list[RunDir], out: Path, axis: str = "step") -> tuple[list[Path], list[str]]:
    """Write the PNGs of `runs` (overlaid when several) into `out`. Returns (files, notes): a
    figure no run has data for is not written, and a note says so."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if axis not in AXES:
        raise UserError(f"--x {axis} is not one of: {', '.join(AXES)}")
    labels = [r.name for r in runs]
    if len(set(labels)) < len(labels):  # the same name from two roots: tell them apart by path
        labels = [str(r.path) for r in runs]
    series = [Series(r, label) for r, label in zip(runs, labels)]
    for s in series:
        if s.empty():
            raise UserError(f"run '{s.run.name}' has no metrics yet ({s.run.metrics_path} has no rows)")
    scale, unit = _time_unit(series)
    xlabel = _xlabel(axis, unit)
    many = len(series) > 1
    colors = [f"C{i % 10}" for i in range(len(series))]
    suffix = "" if many else f" ({series[0].label})"
    out.mkdir(parents=True, exist_ok=True)
    written, notes = [], []

    def save(fig, name: str, drawn: bool, what: str) -> None:
        if drawn:
            path = out / name
            fig.savefig(path, dpi=DPI)
            written.append(path)
        else:
            notes.append(f"{name}: no {what} in {'these runs' if many else 'this run'}")

    for name, key, title, ylabel in (("train_loss.png", "loss", "train loss", "loss (mean between log lines)"),
                                     ("lr.png", "lr", "learning rate", "learning rate"),
                                     ("tok_s.png", "tok/s", "training throughput", "tokens / s")):
        fig = Figure(figsize=SIZE, layout="constrained")
        ax = fig.subplots()
        drawn = False
        for s, c in zip(series, colors):
            drawn |= _line(ax, s, s.train, key, axis, scale, c, s.label)
        _finish(ax, title + suffix, xlabel, ylabel, legend=many)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
        save(fig, name, drawn, title)

    fig = Figure(figsize=WIDE, layout="constrained")
    ax_loss, ax_right = fig.subplots(1, 2)
    drawn = teacher = False
    right = "val/bpb" if any(s.y(s.val, "val/bpb")[1] for s in series) else "val/score"
    for s, c in zip(series, colors):
        drawn |= _line(ax_loss, s, s.val, "val/loss", axis, scale, c, s.label)
        tc, tl = (c, f"{s.label}: teacher") if many else ("0.45", "teacher")  # one run: a grey teacher line
        if _line(ax_loss, s, s.val, "val/teacher_loss", axis, scale, tc, tl, linestyle="--"):
            teacher = True
        drawn |= _line(ax_right, s, s.val, right, axis, scale, c, s.label)
    lm = right == "val/bpb"  # a language model's validation; else a task's (loss per example, its first metric)
    _finish(ax_loss, "validation loss" + suffix, xlabel, "val loss (nats / token)" if lm else "val loss (nats)", legend=many or teacher)
    _finish(ax_right, ("validation bits per byte" if lm else "validation score") + suffix, xlabel,
            "val bits / byte" if lm else f"val {_score_name(series)}", legend=many)
    save(fig, "val.png", drawn, "validation rows")
    return written, notes


def _score_name(series: list[Series]) -> str:
    """The metric a fine-tuning run's val/score repeats (its task's first: accuracy, matthews, ...)."""
    for s in series:
        for r in s.val:
            if "val/score" in r:
                named = [k[4:] for k, v in r.items() if k.startswith("val/") and k not in ("val/score", "val/loss") and v == r["val/score"]]
                if named:
                    return named[0]
    return "score (the task's first metric)"


def plot_dir(run: RunDir) -> Path:
    return run.path / "plots"


def after_run(run: RunDir | None) -> None:
    """A finished run's plots into <run>/plots/ when matplotlib is importable; a plotting
    failure is one warning line, never a failed run."""
    if run is None or os.environ.get("LMTK_PLOTS", "1") == "0":
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    try:
        files, _ = plot_runs([run], plot_dir(run))
        if files:
            from lmtk.log import console

            console.print(f"[dim]plots: {plot_dir(run)}/ ({', '.join(f.name for f in files)})[/dim]")
    except Exception as err:  # noqa: BLE001 -- plots are a convenience; the run is done
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"warning: plots not written: {msg} (lmtk plot {run.name} retries)", file=sys.stderr)
