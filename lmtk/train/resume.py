"""Resuming: which checkpoint, and whether it may continue under the config given now.

A resumed run must be the run it was: the same data stream (data, seed, batch and
micro-batch sizes: the saved data position and per-step seeds mean other windows and masks
otherwise), model, tokenizer and objective. Changes that leave it the same run (budget,
logging, checkpoint and validation cadence, learning rate, precision, process count) are
allowed and recorded in run.json's history. Everything here runs before any run directory
is created or changed."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lmtk import checkpoint
from lmtk.errors import UserError
from lmtk.runs import RunDir, runs_root

# What a run is: a change under any of these keys is refused on resume.
IDENTITY = ("seed", "data.", "tokenizer.", "model.", "objective.", "train.batch_size", "train.micro_batch_size",
            "task.", "peft.", "head.",  # lmtk finetune (its base is checked by fingerprint)
            "distill.init", "distill.stages", "distill.alpha", "distill.temperature", "distill.kl")  # lmtk distill (the teacher: fingerprint)
# ... except these, which change how the same computation runs, not what it computes.
HOW = ("objective.fused_head", "objective.head_chunk")
# Never compared: where and under which name the run lives, and how it was started.
IGNORED = ("run.", "resume", "recipe", "description",
           "model.vocab_size")  # filled in from the tokenizer: the user changed tokenizer.*, which says more


def target(cfg, name: str) -> tuple[str, Path | None]:
    """(run name, checkpoint or None) for resume=false|auto|PATH."""
    if cfg.resume in (False, None, "false", "False"):
        return name, None
    if cfg.resume == "auto":
        if not cfg.run.name:
            raise UserError("resume=auto needs run.name=NAME, the run to continue (`lmtk runs` lists them)")
        run = RunDir(runs_root(cfg.run.root) / name)
        if run.info().get("status") == "done":
            raise UserError(f"run '{name}' already finished; nothing to resume (run.overwrite=true starts it again)")
        return name, run.latest_checkpoint()
    ckpt = checkpoint.resolve(cfg.resume)
    return (cfg.run.name or ckpt.parent.parent.name), ckpt


def same_run(cfg, name: str, ckpt: Path) -> bool:
    """Whether `ckpt` belongs to the run being continued (not a new run started from it)."""
    return cfg.resume == "auto" or ckpt.resolve().parent.parent == (runs_root(cfg.run.root) / name).resolve()


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved_yaml: str | None, cfg) -> dict:
    """{key: (saved, now)} for every leaf that differs (keys the saved config lacks, added to
    lmtk since, are not differences)."""
    if not saved_yaml:
        return {}
    saved = _flat(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    return {
        k: (saved[k], now.get(k)) for k in sorted(saved.keys() & now.keys())
        if saved[k] != now.get(k) and not k.startswith(IGNORED)
    }


def _with_old_defaults(saved: dict) -> dict:
    """A checkpoint's model config with the keys added to ModelConfig since it was written set to
    their defaults, which are what such a checkpoint means (norm_eps None, rope_layout interleaved)."""
    from dataclasses import MISSING, fields

    from lmtk.models import ModelConfig

    old = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING and f.name not in saved}
    return {**old, **saved} if saved else saved


def adopt_old_model_keys(ckpt: Path, cfg) -> None:
    """A checkpoint written before a model key existed was trained with that key's old meaning:
    its run (resumed, or a new run started from it) takes it. model.rope_layout: the checkpoint's
    weights are in its own layout (interleaved where the key is missing), whatever the recipe
    says today (half between 2026-11-29 and 12-02, interleaved before and after)."""
    saved = checkpoint.read_meta(ckpt).get("model", {})
    if cfg.model.get("positions") == "rope" and saved.get("positions") == "rope":
        OmegaConf.update(cfg, "model.rope_layout", saved.get("rope_layout", "interleaved"))


def check(ckpt: Path, cfg, model_meta: dict, tok, data_meta: dict, same: bool) -> tuple[int, dict]:
    """Verify `ckpt` (checksums) and that it may continue under `cfg`. Returns (its step, the
    allowed config changes {key: (saved, now)}). A new run started from another run's
    checkpoint (same=False) only needs its model and tokenizer."""
    meta = checkpoint.verify(ckpt)
    changes = config_changes(checkpoint.config_text(ckpt), cfg) if same else {}
    for key, (was, now) in changes.items():  # first: these name the setting the user changed
        if key.startswith(IDENTITY) and not key.startswith(HOW):
            raise UserError(
                f"cannot resume run '{cfg.run.name}' with {key}={now}: it was trained with {key}={was} "
                f"(the data stream, model, tokenizer or objective would change); pass {key}={was}, or start a new run"
            )
    from lmtk.models import ModelConfig

    # keys added since the checkpoint was written take their old meaning; old spellings normalised
    saved = ModelConfig.from_dict(_with_old_defaults(meta["model"])).to_dict() if meta.get("model") else {}
    diff = sorted(k for k in set(saved) | set(model_meta) if saved.get(k) != model_meta.get(k))
    if diff:
        show = ", ".join(f"{k}: {saved.get(k)} -> {model_meta.get(k)}" for k in diff[:4])
        raise UserError(f"cannot resume from {ckpt}: the model config differs ({show}); resume with the checkpoint's model settings")
    _check_tokenizer(ckpt, tok)
    if not same:
        return int(meta["step"]), {}
    for key in ("train_tokens", "val_tokens"):
        was, now = meta.get("data", {}).get(key), data_meta.get(key)
        if was is not None and now is not None and was != now:
            raise UserError(
                f"cannot resume run '{cfg.run.name}': its data changed since the checkpoint ({key.split('_')[0]} split: "
                f"{was:,} tokens then, {now:,} now); resume with the data it was trained on, or start a new run"
            )
    return int(meta["step"]), {k: v for k, v in changes.items() if not k.startswith(IDENTITY) or k.startswith(HOW)}


def _check_tokenizer(ckpt: Path, tok) -> None:
    from lmtk.data.tokenizer import Tokenizer

    saved = checkpoint.tokenizer_path(ckpt)
    if saved.read_text() != tok.to_str() and Tokenizer.from_file(saved).fingerprint() != tok.fingerprint():
        raise UserError(f"checkpoint {ckpt} was trained with a different tokenizer; resume with its data and tokenizer settings")
