"""RunDir: one directory per run, the only place lmtk writes; and the listing of runs.

runs/<name>/
  run.json  config.yaml  overrides.yaml  tokenizer.json  model.json  metrics.jsonl
  checkpoints/step-000500/   checkpoints/final/    (the format: lmtk/checkpoint.py)
  eval/<suite>.json                                (lmtk eval: lmtk/eval/results.py)
  plots/*.png                                      (lmtk plot: lmtk/plot.py)

The run directory owns the lock, run.json (status, history) and where checkpoints go;
what is inside a checkpoint, and loading one, is lmtk.checkpoint's business.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from lmtk.checkpoint import write_atomic
from lmtk.errors import UserError

CKPT_RE = re.compile(r"^step-(\d+)$")


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def versions() -> dict:
    import lmtk

    v = {"lmtk": lmtk.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "tokenizers", "hydra", "datasets", "safetensors"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            pass
    return v


def runs_root(root) -> Path:
    return Path(root).expanduser().resolve()


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self._locked = False

    # ---- layout -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def info(self) -> dict:
        try:
            return json.loads((self.path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def metrics(self) -> list[dict]:
        """metrics.jsonl's rows (a torn last line from a crash skipped)."""
        rows = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def update_info(self, **fields) -> None:
        info = self.info()
        info.update(fields)
        write_atomic(self.path / "run.json", json.dumps(info, indent=2, default=str))

    def truncate_metrics(self, step: int) -> None:
        """Keep only metrics rows up to `step` (0: none), so a resumed run's history has no duplicates."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step and step > 0:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a crash
        write_atomic(self.metrics_path, "".join(l + "\n" for l in keep))

    # ---- creation and lookup ------------------------------------------------------------
    @classmethod
    def open(cls, root, name: str) -> "RunDir":
        """An existing run by name (or path); a clear error when there is none."""
        p = Path(name).expanduser()
        path = p if (p / "run.json").is_file() else runs_root(root) / name
        if not (path / "run.json").is_file():
            raise UserError(f"no run named '{name}' in {runs_root(root)}; `lmtk runs` lists them")
        return cls(path)

    @classmethod
    def prepare(cls, root, name: str, *, resume, overwrite: bool) -> tuple["RunDir", bool]:
        """The run directory for a new or resumed run. Returns (rundir, exists_already).

        Refuses to touch an existing run unless resume or overwrite says so."""
        path = runs_root(root) / name
        exists = (path / "run.json").is_file()
        if exists and not resume and not overwrite:
            raise UserError(
                f"run '{name}' already exists in {path.parent}; continue it with resume=auto, "
                f"replace it with run.overwrite=true, or pick another run.name"
            )
        run = cls(path)
        if exists and overwrite and not resume:
            run.lock()  # never delete a directory another process is writing
            shutil.rmtree(path)
            run._locked = False  # the lock file went with the directory
            exists = False
        path.mkdir(parents=True, exist_ok=True)
        run.lock()
        return run, exists

    # ---- lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        if self._locked:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UserError(
                        f"run '{self.name}' is in use by process {pid}; wait for it or pick another run.name"
                    ) from None
                warnings.warn(f"taking over the stale lock of run '{self.name}' (process {pid} is gone)")
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return

    def unlock(self) -> None:
        if self._locked:
            (self.path / ".lock").unlink(missing_ok=True)
            self._locked = False

    # ---- run.json -----------------------------------------------------------------------
    def start(self, *, kind: str, recipe: str, device: str, parents: dict | None = None, resumed: bool) -> None:
        info = self.info() if resumed else {}
        info.update(
            name=self.name,
            kind=kind,
            recipe=recipe,
            status="running",
            created=info.get("created", _now()),
            updated=_now(),
            versions=versions(),
            git_sha=_git_sha(),
            device=device,
            host=platform.node(),
            command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            parents=parents or {},
        )
        if resumed:
            info["resumed"] = info.get("resumed", 0) + 1
        write_atomic(self.path / "run.json", json.dumps(info, indent=2, default=str))

    def add_history(self, **entry) -> None:
        """Append to run.json's history: each resume, at which step, with which overrides and
        which (allowed) config changes."""
        info = self.info()
        command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
        info.setdefault("history", []).append({"at": _now(), "command": command, **entry})
        write_atomic(self.path / "run.json", json.dumps(info, indent=2, default=str))

    def finish(self, status: str, **fields) -> None:
        self.update_info(status=status, updated=_now(), **fields)

    @contextlib.contextmanager
    def recording(self):
        """The part of a command that writes this run (train, finetune): run.json ends
        `interrupted` on Ctrl-C / SIGTERM, `failed` with the error's first line on any other
        error, and the lock is released whatever happens. The body marks `done` itself."""
        from lmtk.train.loop import Interrupted

        try:
            yield self
        except (Interrupted, KeyboardInterrupt):
            self.finish("interrupted")
            raise
        except BaseException as err:
            self.finish("failed", error=str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise
        finally:
            self.unlock()

    @classmethod
    def write_run(cls, root, cfg, *, kind: str, recipe: str, overrides: list, device: str, save_tokenizer, model: dict,
                  ckpt=None, ckpt_step: int = 0, changes: dict | None = None, same: bool = False, parents: dict | None = None,
                  body=None) -> dict:
        """What every command that trains (train, finetune, distill) does on rank 0 around its
        training: prepare and lock run `cfg.run.name` (a new run, or the same one resumed), drop
        metrics rows after the checkpoint resumed from, write overrides.yaml / tokenizer.json
        (`save_tokenizer(path)`) / model.json for a new run and config.yaml always, start run.json
        (kind, parents; `resumed_from` for a run started from another's checkpoint), record the
        resume in its history, then `body(rundir) -> summary` and status done (failed /
        interrupted through recording())."""
        from omegaconf import OmegaConf

        from lmtk.checkpoint import write_atomic

        continuing = same or (ckpt is None and cfg.resume == "auto")
        rundir, existed = cls.prepare(root, cfg.run.name, resume=continuing, overwrite=cfg.run.overwrite)
        with rundir.recording():
            rundir.truncate_metrics(ckpt_step)  # drop rows logged after the checkpoint we resume from
            if not existed or not same:  # a new run (also one started from another run's checkpoint) gets its files
                write_atomic(rundir.file("overrides.yaml"), OmegaConf.to_yaml(OmegaConf.create({"recipe": recipe, "overrides": overrides})))
                save_tokenizer(rundir.file("tokenizer.json"))
                write_atomic(rundir.file("model.json"), json.dumps(model, indent=2))
            write_atomic(rundir.file("config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))  # kept true across resumes
            rundir.start(kind=kind, recipe=recipe, device=device, resumed=same,
                         parents={**(parents or {}), **({} if same or ckpt is None else {"resumed_from": str(ckpt)})})
            if ckpt is not None:
                rundir.add_history(step=ckpt_step, overrides=overrides, changed={k: list(v) for k, v in (changes or {}).items()})
            summary = body(rundir)
            rundir.finish("done", summary=summary)
        from lmtk.plot import after_run

        after_run(rundir)  # <run>/plots/ when matplotlib is importable; never fails the finished run
        return summary

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete step checkpoints, oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found) if (p / "meta.json").is_file()]

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, tag: str, model, state: dict, meta: dict, *, tokenizer: str, config: str,
                        keep: int | None = None, weights: dict | None = None) -> Path:
        """Write checkpoints/<tag>/ (lmtk.checkpoint.write); rotate step checkpoints down to `keep`."""
        from lmtk import checkpoint

        final = checkpoint.write(self.ckpt_dir / tag, model, state, meta, tokenizer=tokenizer, config=config, weights=weights)
        if keep is not None and keep > 0:
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _eval_headlines(path: Path) -> dict:
    """suite -> {score, value}: the headline of each eval/<suite>.json (lmtk eval)."""
    from lmtk.eval.results import headlines

    return {suite: {"score": k, "value": v} for suite, (k, v) in headlines(path).items()}


def list_runs(root) -> list[dict]:
    """One row per run in `root` for `lmtk runs`: run.json plus progress from metrics.jsonl
    (a run without a summary yet: its last logged step, tokens and val loss / bpb)."""
    out = []
    base = runs_root(root)
    if not base.is_dir():
        return out
    for p in sorted(base.iterdir()):
        run = RunDir(p)
        info = run.info()
        if not info:
            continue
        summary = info.get("summary") or {}
        row = {
            "name": p.name,
            "kind": info.get("kind"),
            "status": live_status(p, info),
            "parent": parent_label(info, root),
            "created": info.get("created"),
            "steps": summary.get("steps"),
            "tokens": summary.get("tokens"),
            "val_loss": summary.get("val/loss"),
            "val_bpb": summary.get("val/bpb"),
        }
        if row["steps"] is None and run.metrics_path.is_file():
            for line in run.metrics_path.read_text().splitlines():
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:
                    continue
                row["steps"] = m.get("step", row["steps"])
                row["tokens"] = m.get("tokens", row["tokens"])
                row["val_loss"] = m.get("val/loss", row["val_loss"])
                row["val_bpb"] = m.get("val/bpb", row["val_bpb"])
        row["eval"] = _eval_headlines(p / "eval")
        out.append(row)
    out.sort(key=lambda r: r.get("created") or "")
    return out


# ---- inspection: lineage, liveness, removal (lmtk runs / runs show / compare / rm) ----------


def writer_pid(path: Path) -> int | None:
    """The pid of a live process holding the run's lock (a run being written), else None."""
    try:
        pid = int((Path(path) / ".lock").read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and _alive(pid) else None


def live_status(path: Path, info: dict) -> str:
    """run.json's status, but `stale` for a run marked running whose process is gone (killed)."""
    status = info.get("status") or "?"
    if status == "running" and writer_pid(path) is None:
        return "stale"
    return status


def _resolved(p) -> Path:
    try:
        return Path(p).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(p)


def ref_name(ref, root) -> str:
    """A parent reference (a run directory, a checkpoint inside one, a Hugging Face directory) as
    the user would write it: the run's name when it lives in `root` (`run@step-000500` for a step
    checkpoint), else the path as recorded."""
    p = _resolved(ref)
    base = runs_root(root)
    try:
        rel = p.relative_to(base).parts
    except ValueError:
        return str(ref)
    if not rel:
        return str(ref)
    name = rel[0]
    if len(rel) >= 3 and rel[1] == "checkpoints":
        return name if rel[2] == "final" else f"{name}@{rel[2]}"
    return name


def parent_label(info: dict, root) -> str | None:
    """'teacher t1', 'base bert@step-000500', 'from a@step-000010' (a new run started from another
    run's checkpoint); None for a run trained from scratch."""
    parents = info.get("parents") or {}
    labels = [f"{role} {ref_name(ref, root)}" for role, ref in parents.items() if role != "resumed_from" and ref]
    if parents.get("resumed_from"):
        labels.append(f"from {ref_name(parents['resumed_from'], root)}")
    return ", ".join(labels) or None


def names_run(ref, run_path: Path) -> bool:
    """Whether a parent reference is the run directory `run_path` or a path inside it (a checkpoint)."""
    p, r = _resolved(ref), _resolved(run_path)
    return p == r or r in p.parents


def children(root, run_path: Path) -> list[tuple[str, str, str]]:
    """(name, role, kind) of each run in `root` whose parents name `run_path` or a checkpoint in it."""
    out = []
    base = runs_root(root)
    if not base.is_dir():
        return out
    for p in sorted(base.iterdir()):
        if _resolved(p) == _resolved(run_path):
            continue
        info = RunDir(p).info()
        for role, ref in (info.get("parents") or {}).items():
            if ref and names_run(ref, run_path):
                out.append((p.name, role, info.get("kind") or "?"))
                break
    return out


def remove(run: RunDir) -> None:
    """Delete a run directory; refuses a run whose writer is alive (taking its lock first, so no
    command can start writing it while it goes)."""
    pid = writer_pid(run.path)
    if pid is not None:
        raise UserError(f"run '{run.name}' is running (process {pid}); stop it first (Ctrl-C), then lmtk runs rm {run.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale lock of a killed run: taken over silently, it is going anyway
        run.lock()
    shutil.rmtree(run.path)
    run._locked = False


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
