"""The checkpoint format: a directory that stands alone.

checkpoints/<tag>/
  model.safetensors   weights (safetensors: loading cannot execute code)
  state.pt            trainer state: optimizer, GradScaler, RNG, progress (torch.load weights_only)
  tokenizer.json      the tokenizer the model was trained with
  config.yaml         the run's resolved config when it was saved
  meta.json           tag, step, tokens, model (ModelConfig), objective {name, masked_shift},
                      sha256 checksums of the files above

A checkpoint directory can be copied anywhere and given by path to `lmtk generate` (and to
every later command): nothing in it refers to the run directory around it. It is written to
a temporary directory, fsynced and renamed, so a directory named step-N or final is complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from lmtk.errors import UserError

FILES = ("model.safetensors", "state.pt", "tokenizer.json", "config.yaml")



def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the complete directory tmp at dest by renames: an existing dest is moved aside first and
    removed after, so dest is always either the old directory or the new one."""
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
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


def write(dest: Path, model, state: dict, meta: dict, *, tokenizer: str, config: str, weights: dict | None = None) -> Path:
    """Write the checkpoint directory `dest` atomically (replacing one that exists).
    `tokenizer` and `config` are the texts of tokenizer.json and config.yaml; `weights` the
    full state dict when the model itself is sharded (FSDP)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(model, tmp / "model.safetensors", weights)
        torch.save(state, tmp / "state.pt")
        (tmp / "tokenizer.json").write_text(tokenizer)
        (tmp / "config.yaml").write_text(config)
        for f in FILES:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        meta = dict(meta, checksums={f: _sha256(tmp / f) for f in FILES},
                    saved=_dt.datetime.now().isoformat(timespec="seconds"))
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
        fsync_dir(tmp)
        replace_dir(tmp, dest)  # replacing (e.g. final/ after a resume) moves the old one aside first
        fsync_dir(dest.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (disk full: free space or raise checkpoint.every)" if err.errno == 28 else ""
        raise UserError(f"could not save checkpoint {dest.name}: {err.strerror}{hint}; earlier checkpoints are intact") from None
    return dest


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


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "meta.json").is_file()


def resolve(path) -> Path:
    """A checkpoint directory from a path: the checkpoint itself, or a run (its latest step
    checkpoint, else final/)."""
    from lmtk.runs import RunDir

    p = Path(path).expanduser()
    if is_checkpoint(p):
        return p
    run = RunDir(p)
    for cand in (run.latest_checkpoint(), run.ckpt_dir / "final"):
        if cand is not None and is_checkpoint(cand):
            return cand
    raise UserError(f"no checkpoint at {path} (expected a directory with meta.json, or a run with checkpoints)")


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {ckpt} has an unreadable meta.json ({err}); use an earlier checkpoint") from None


def verify(ckpt: Path) -> dict:
    """meta.json after checking every file's checksum."""
    meta = read_meta(ckpt)
    for f, digest in meta.get("checksums", {}).items():
        p = ckpt / f
        if not p.is_file() or _sha256(p) != digest:
            raise UserError(f"checkpoint file {p} is missing or corrupted (checksum mismatch); use an earlier checkpoint")
    return meta


def _beside(ckpt: Path, name: str) -> Path | None:
    """A file of the checkpoint; checkpoints written before they stood alone keep it in the run."""
    for cand in (ckpt / name, ckpt.parent.parent / name):
        if cand.is_file():
            return cand
    return None


def tokenizer_path(ckpt: Path) -> Path:
    p = _beside(ckpt, "tokenizer.json")
    if p is None:
        raise UserError(f"checkpoint {ckpt} has no tokenizer.json (nor has its run); copy the run's tokenizer.json into it")
    return p


def config_text(ckpt: Path) -> str | None:
    """The run's resolved config (YAML) saved with the checkpoint, if known."""
    p = _beside(ckpt, "config.yaml")
    return p.read_text() if p is not None else None


def masked_shift(meta: dict) -> int:
    """The masked-prediction convention of the objective that trained the checkpoint: the
    output at p - shift predicts token p (0: BERT's MLM, 1: GPT-BERT's masked next-token).
    Checkpoints from before it was stored know only the objective's name."""
    obj = meta.get("objective")
    if isinstance(obj, dict):
        return int(obj.get("masked_shift", 0))
    return 1 if obj == "gpt-bert" else 0


def objective_name(meta: dict) -> str | None:
    obj = meta.get("objective")
    return obj.get("name") if isinstance(obj, dict) else obj


OBJECTIVE_HEADS = "objective_heads."  # LanguageModel.objective_heads: an objective's training-only heads


def load_weights(model, ckpt: Path, objective_heads: bool = False) -> None:
    """The checkpoint's tensors into `model`, every one of them. An objective's training-only heads
    (mtp's extra heads, rts's classifier: `objective_heads.*`) are dropped unless objective_heads
    (resuming training, whose objective attached the same heads): generation, evaluation, export and
    fine-tuning use the model's own head alone."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(ckpt / "model.safetensors"))
        if not objective_heads:
            state = {k: v for k, v in state.items() if not k.startswith(OBJECTIVE_HEADS)}
        for tied in parameter_names(model).values():  # the file holds one name of a tied parameter
            there = [n for n in tied if n in state]
            state.update({n: state[there[0]] for n in tied if there and n not in state})
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as err:
        raise UserError(f"checkpoint {ckpt} does not fit this model: {str(err).splitlines()[0]}") from None
    _refuse_other_heads(ckpt, [*missing, *unexpected])
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt} is for a different architecture (missing {len(missing)}, unexpected {len(unexpected)} tensors)"
        )


def check_objective_heads(ckpt: Path, model) -> None:
    """Refuse, before any run directory is written, to continue training `ckpt` with an objective whose
    training heads (model.objective_heads, attached) are not the checkpoint's."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        have = {k for k in f.keys() if k.startswith(OBJECTIVE_HEADS)}
    want = {OBJECTIVE_HEADS + k for k in model.objective_heads.state_dict()}
    _refuse_other_heads(ckpt, have ^ want)


def _refuse_other_heads(ckpt: Path, names) -> None:
    heads = sorted({k[len(OBJECTIVE_HEADS):].split(".")[0] for k in names if k.startswith(OBJECTIVE_HEADS)})
    if heads:
        raise UserError(f"checkpoint {ckpt} and this run's objective differ in their training heads ({', '.join(heads)}): "
                        "a run continues with its checkpoint's objective; to train a checkpoint with another one, "
                        f"use lmtk finetune base={ckpt} objective=NAME data=...")


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot load trainer state of {ckpt}: {str(err).splitlines()[0]}") from None


def locate(path, root=None) -> Path:
    """The checkpoint directory of a run name, run directory or checkpoint directory: a run gives
    its final/ checkpoint (else its latest step)."""
    from lmtk.runs import RunDir, runs_root

    p = Path(path).expanduser()
    if not p.exists() and root is not None:
        p = runs_root(root) / str(path)
    if not p.exists():
        raise UserError(f"no run named '{path}' (looked in {runs_root(root) if root else Path.cwd()}); `lmtk runs` lists them")
    if is_checkpoint(p):
        return p
    final = RunDir(p).ckpt_dir / "final"
    return final if is_checkpoint(final) else resolve(p)


def load_pretrained(path, root=None):
    """(model, tokenizer, meta) from a run name, run directory or checkpoint directory (locate).

    A checkpoint directory needs nothing around it. meta carries the objective's masked
    convention (masked_shift())."""
    from lmtk.data.tokenizer import Tokenizer
    from lmtk.models import ModelConfig, build_model

    ckpt = locate(path, root)
    meta = verify(ckpt)
    if meta.get("finetune"):  # a fine-tuning run: its PEFT layers merged, its task head dropped
        from lmtk.finetune.base import load_language_model

        model = load_language_model(ckpt, meta)[0]
    else:
        model = build_model(ModelConfig.from_dict(meta["model"]))
        load_weights(model, ckpt)
    model.eval()
    # meta["specials"]: the tokenizer's special-token roles, where they were not lmtk's five
    # (a model imported from Hugging Face, models/hf.py); absent: read from the tokenizer itself
    return model, Tokenizer.from_file(tokenizer_path(ckpt), specials=meta.get("specials")), meta
