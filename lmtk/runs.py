"""RunDir: one directory per run, the only place lmtk writes.

runs/<name>/
  run.json  config.yaml  overrides.yaml  tokenizer.json  model.json  metrics.jsonl
  checkpoints/step-000500/{model.safetensors, state.pt, meta.json}   checkpoints/final/

Checkpoints are written to a temporary directory, fsynced, then renamed: a directory
named step-N or final is always complete. meta.json carries sha256 checksums that are
verified on load. Weights load only through safetensors, trainer state only through
torch.load(weights_only=True): nothing in a run directory can execute code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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

from lmtk.errors import UserError

CKPT_RE = re.compile(r"^step-(\d+)$")


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    def finish(self, status: str, **fields) -> None:
        self.update_info(status=status, updated=_now(), **fields)

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

    def save_checkpoint(self, tag: str, model, state: dict, meta: dict, keep: int | None = None, weights: dict | None = None) -> Path:
        """Write checkpoints/<tag>/ atomically; rotate step checkpoints down to `keep`.
        `weights`: the full state dict when the model itself is sharded (FSDP)."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_dir / tag
        tmp = self.ckpt_dir / f".tmp-{tag}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_weights(model, tmp / "model.safetensors", weights)
            torch.save(state, tmp / "state.pt")
            for f in ("model.safetensors", "state.pt"):
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            meta = dict(meta, checksums={f: _sha256(tmp / f) for f in ("model.safetensors", "state.pt")}, saved=_now())
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
            _fsync_dir(tmp)
            if final.exists():  # replacing (e.g. final/ after a resume): move the old one aside first
                old = self.ckpt_dir / f".old-{tag}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            hint = " (disk full: free space or raise checkpoint.every)" if err.errno == 28 else ""
            raise UserError(f"could not save checkpoint {tag}: {err.strerror}{hint}; earlier checkpoints are intact") from None
        if keep is not None and keep > 0:
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def parameter_names(model) -> dict[int, list[str]]:
    """id(parameter) -> every name the model gives it (a tied parameter has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def save_weights(model, path: Path, weights: dict | None = None) -> None:
    """model.safetensors from the model, or from a gathered full state dict of it (FSDP).
    Gathered tensors are copies, so tied names no longer share storage for safetensors to
    detect: drop them by the model's own ties, keeping the name save_model keeps (the first
    in sorted order), so the file is the same whichever strategy wrote it."""
    from safetensors.torch import save_file, save_model

    if weights is None:
        save_model(model, str(path))
        return
    weights, dropped = dict(weights), {}
    for tied in parameter_names(model).values():
        keep, *rest = sorted(tied)
        for name in rest:
            weights.pop(name, None)
            dropped[name] = keep
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata=dropped or None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from a path: the checkpoint itself, a run (its latest), or final/."""
    p = Path(path).expanduser()
    if (p / "meta.json").is_file():
        return p
    run = RunDir(p)
    for cand in (run.latest_checkpoint(), run.ckpt_dir / "final"):
        if cand is not None and (cand / "meta.json").is_file():
            return cand
    raise UserError(f"no checkpoint at {path} (expected a directory with meta.json, or a run with checkpoints)")


def read_checkpoint_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {ckpt} has an unreadable meta.json ({err}); use an earlier checkpoint") from None


def verify_checkpoint(ckpt: Path) -> dict:
    meta = read_checkpoint_meta(ckpt)
    for f, digest in meta.get("checksums", {}).items():
        p = ckpt / f
        if not p.is_file() or _sha256(p) != digest:
            raise UserError(f"checkpoint file {p} is missing or corrupted (checksum mismatch); use an earlier checkpoint")
    return meta


def load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except Exception as err:
        raise UserError(f"checkpoint {ckpt} does not fit this model: {str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt} is for a different architecture (missing {len(missing)}, unexpected {len(unexpected)} tensors)"
        )


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def list_runs(root) -> list[dict]:
    """One row per run in `root` for `lmtk runs`: run.json plus progress from metrics.jsonl."""
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
            "status": info.get("status"),
            "created": info.get("created"),
            "steps": summary.get("steps"),
            "tokens": summary.get("tokens"),
            "val_loss": summary.get("val/loss"),
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
        out.append(row)
    out.sort(key=lambda r: r.get("created") or "")
    return out


def load_pretrained(path, root=None):
    """(model, tokenizer, meta) from a run name, run directory or checkpoint directory.

    Weights come from the checkpoint (final/ or the latest step) through safetensors;
    meta.json says which objective trained it (models.infer needs its masked convention)."""
    from lmtk.data.tokenizer import Tokenizer
    from lmtk.models import ModelConfig, build_model

    p = Path(path).expanduser()
    if not p.exists() and root is not None:
        p = runs_root(root) / str(path)
    if not p.exists():
        raise UserError(f"no run named '{path}' (looked in {runs_root(root) if root else Path.cwd()}); `lmtk runs` lists them")
    ckpt = p if (p / "meta.json").is_file() else None
    if ckpt is None:
        run = RunDir(p)
        final = run.ckpt_dir / "final"
        ckpt = final if (final / "meta.json").is_file() else resolve_checkpoint(p)
    meta = verify_checkpoint(ckpt)
    model = build_model(ModelConfig.from_dict(meta["model"]))
    load_weights(model, ckpt)
    model.eval()
    tok = Tokenizer.from_file(ckpt.parent.parent / "tokenizer.json")
    return model, tok, meta
