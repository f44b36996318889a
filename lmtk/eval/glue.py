"""suite=glue: GLUE the Cramming way, through `lmtk finetune` (Geiping & Goldstein 2023, sec. 4).

For each task the run's checkpoint is fine-tuned with ONE set of hyperparameters for every task
(recipes/finetune.yaml: at most 5 epochs, lr 4e-5, batch 16, cosine with 10% warm-up; change it
for all tasks at once with `glue.overrides=[...]`), as a run of its own (`<run>-glue-<task>`,
kind finetune, parent the checkpoint), and scored on the task's validation split after each
epoch. A task's score is its best epoch's, the mean of its metrics where GLUE has two (MRPC and
QQP: F1 and accuracy; STS-B: Pearson and Spearman); the headline is the average over tasks,
as in GLUE's and Cramming's tables.

Tasks are GLUE names (conf/task/glue/NAME.yaml: nyu-mll/glue through `datasets`) or folders of
local files: train.{tsv,csv,jsonl} and dev (or val, validation) of the same kind, with the columns
`glue.text`, `glue.text_pair`, `glue.label`; the folder's name names the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from lmtk.errors import UserError

# Cramming's GLUE table (WNLI left out, as BERT and Cramming do)
CRAMMING_TASKS = ["mnli", "sst2", "stsb", "rte", "qnli", "qqp", "mrpc", "cola"]
SUFFIXES = (".tsv", ".csv", ".jsonl")


@dataclass
class Config:
    tasks: List[str] = field(default_factory=lambda: list(CRAMMING_TASKS))  # GLUE names or folders of local files
    peft: str = "full"  # full | bitfit | lora: the method every task is fine-tuned with
    overrides: List[str] = field(default_factory=list)  # finetune overrides for every task, e.g. [budget.epochs=2]
    text: str = "sentence"  # local folders: the text column
    text_pair: Optional[str] = None  # local folders: the second text's column (pair tasks)
    label: str = "label"  # local folders: the label column
    metrics: List[str] = field(default_factory=lambda: ["accuracy"])  # local folders: the metrics (the first is the score)


def glue_names() -> list[str]:
    from lmtk.config import conf_dir

    return sorted(p.stem for p in (conf_dir() / "task" / "glue").glob("*.yaml"))


def _split_file(folder: Path, stems) -> Path | None:
    for stem in stems:
        for suf in SUFFIXES:
            if (folder / f"{stem}{suf}").is_file():
                return folder / f"{stem}{suf}"
    return None


def task_overrides(task: str, cfg: Config) -> tuple[str, list[str]]:
    """(the task's name, the finetune overrides that select it)."""
    from lmtk.errors import suggest

    if task in glue_names():
        return task, [f"task=glue/{task}"]
    folder = Path(task).expanduser()
    if not folder.is_dir():
        raise UserError(f"glue.tasks: '{task}' is neither a GLUE task ({', '.join(glue_names())}) nor a folder of "
                        f"local files{suggest(task, glue_names())}")
    train = _split_file(folder, ["train"])
    val = _split_file(folder, ["dev", "val", "validation"])
    if train is None or val is None:
        raise UserError(f"glue.tasks: folder {folder} needs train{{.tsv,.csv,.jsonl}} and dev (or val) beside it")
    ov = ["task=local", f"task.name={folder.name}", f"task.train={train.resolve()}", f"task.val={val.resolve()}",
          f"task.text={cfg.text}", f"task.label={cfg.label}", f"task.metrics=[{','.join(cfg.metrics)}]"]
    if cfg.text_pair:
        ov.append(f"task.text_pair={cfg.text_pair}")
    return folder.name, ov


def check(cfg: Config) -> None:
    if not cfg.tasks:
        raise UserError("glue.tasks=[] names no task; e.g. glue.tasks=[sst2,mrpc,rte] or a folder of local files")
    if cfg.peft not in ("full", "bitfit", "lora"):
        raise UserError(f"glue.peft={cfg.peft} is not one of: full, bitfit, lora")
    for t in cfg.tasks:
        task_overrides(str(t), cfg)
    for o in cfg.overrides:
        if "=" not in str(o):
            raise UserError(f"glue.overrides: '{o}' is not key=value (e.g. budget.epochs=3)")


def run(target, cfg: Config) -> dict:
    """Fine-tune target's checkpoint on each task (one run each) and collect the best scores."""
    import os

    from lmtk.config import compose
    from lmtk.finetune.run import run as finetune

    check(cfg)
    if target.run_dir is not None:
        root = target.run_dir.parent
    else:
        root = Path(os.environ.get("LMTK_RUNS", "runs"))
    scores, rows, samples, notes = {}, [], 0, []
    per_task = {}
    import time

    from lmtk.log import _fmt_eta, console

    t0 = time.perf_counter()
    for k, task in enumerate(cfg.tasks):
        name, ov = task_overrides(str(task), cfg)
        if k:  # each task is a fine-tuning run with its own progress bar; between them, where the suite stands
            left = (time.perf_counter() - t0) / k * (len(cfg.tasks) - k)
            console.print(f"glue task {k + 1}/{len(cfg.tasks)}: {name} (suite ETA {_fmt_eta(left)})", markup=False)
        run_name = f"{target.name}-glue-{name}"
        overrides = [f"base={target.checkpoint}", f"peft={cfg.peft}", f"run.name={run_name}", f"run.root={root}",
                     "run.overwrite=true", f"seed={target.seed}", f"device={target.device.type}", *ov,
                     *[str(o) for o in cfg.overrides]]
        fcfg = compose("finetune", overrides)
        summary = finetune(fcfg, "finetune", overrides)
        epochs = summary.get("epochs") or []
        if not epochs:
            raise UserError(f"glue: task {name} ran no validation (budget too small for one epoch?); raise budget.epochs")
        best = max(epochs, key=lambda e: e["score"])
        metric_names = [k for k in best["metrics"] if k not in ("loss", "score")]
        task_score = sum(best["metrics"][m] for m in metric_names) / len(metric_names)
        per_task[name] = task_score
        for m in metric_names:
            scores[f"{name}/{m}"] = best["metrics"][m]
        n_val = _val_count(root / run_name)
        samples += n_val
        rows.append({"task": name, "score": round(task_score, 4),
                     **{m: round(best["metrics"][m], 4) for m in metric_names},
                     "best epoch": best["epoch"], "epochs": len(epochs), "val examples": n_val, "run": run_name})
    average = sum(per_task.values()) / len(per_task)
    scores = {"average": average, **{f"{t}/score": s for t, s in per_task.items()}, **scores}
    notes.append(f"one hyperparameter set for every task (recipes/finetune.yaml{', ' + ' '.join(cfg.overrides) if cfg.overrides else ''}); "
                 f"peft={cfg.peft}; each task's best epoch on its validation split")
    return {"scores": scores, "samples": samples, "rows": rows, "notes": notes}


def _val_count(rundir: Path) -> int:
    import json

    p = rundir / "eval" / "finetune.json"
    try:
        return int(json.loads(p.read_text()).get("samples") or 0)
    except (OSError, ValueError):
        return 0
