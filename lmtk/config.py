"""Compose recipes with Hydra's compose API (no chdir, no output dirs) and validate them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmtk.errors import UserError, suggest
from lmtk.schema import CHOICES, Config

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    # Installed wheel: lmtk/conf; source checkout or editable install: <repo>/conf.
    for cand in (_PKG / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise RuntimeError(f"lmtk is installed without its {name}/ directory")


def conf_dir() -> Path:
    return _find("conf")


def recipes_dir() -> Path:
    return _find("recipes")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


COMMANDS = ("train", "finetune", "distill")


def recipe_command(recipe: str) -> str:
    """Which command a shipped recipe is for: a recipe that is, or builds on, `finetune` or
    `distill` (its defaults list names one) belongs to that command; every other one to train.
    A recipe file of the user's own: train."""
    import yaml

    if recipe not in recipe_names():
        return "train"
    text = yaml.safe_load((recipes_dir() / f"{recipe}.yaml").read_text()) or {}
    for command in ("finetune", "distill"):
        if recipe == command or command in [d for d in text.get("defaults", []) if isinstance(d, str)]:
            return command
    return "train"


def check_recipe_command(recipe: str, command: str) -> None:
    """`lmtk train lolcats` and the like: one line naming the command the recipe is for (a
    pretraining recipe may set up a fine-tuning or distillation run too)."""
    wanted = recipe_command(recipe)
    if wanted not in (command, "train"):
        raise UserError(f"recipe '{recipe}' is an lmtk {wanted} recipe: run lmtk {wanted}{'' if recipe == wanted else ' ' + recipe} ...")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


EVAL_GROUP = "eval"  # conf/eval/: the eval suites' sections, composed by compose_eval (not a training group)


def groups() -> list[str]:
    """Config groups of training recipes (conf/eval/ belongs to `lmtk eval`)."""
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != EVAL_GROUP)


def _recipe_location(recipe: str) -> tuple[Path, str]:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe file not found: {recipe}")
        return path.resolve().parent, path.stem
    if recipe not in recipe_names():
        raise UserError(
            f"unknown recipe '{recipe}'{suggest(recipe, recipe_names())}; `lmtk recipes` lists them"
        )
    return recipes_dir(), recipe


def _flat_keys(cfg, prefix: str = "") -> Iterable[str]:
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, (dict, DictConfig)):
            yield from _flat_keys(v, key + ".")


def _compose_raw(recipe: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    where, name = _recipe_location(recipe)
    search = [f"file://{conf_dir()}"] + ([f"file://{recipes_dir()}"] if where != recipes_dir() else [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(where), version_base=None):
        return compose(name, overrides=list(overrides) + [f"hydra.searchpath=[{','.join(search)}]"])


def _override_error(recipe: str, overrides: list[str], err: Exception, defaults=None) -> UserError:
    msg = str(err)
    m = re.search(r"Could not find '([^']+)/([^/']+)'", msg)
    if m:
        group, option = m.groups()  # group may be nested: model/mixer
        if not (conf_dir() / group).is_dir():
            return UserError(f"unknown config group '{group}'{suggest(group, groups())}")
        return UserError(
            f"unknown option '{option}' for {group}{suggest(option, group_options(group))}; "
            f"choices: {', '.join(group_options(group))}"
        )
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        try:
            base = defaults() if defaults is not None else _compose_raw(recipe, [])
            keys = list(_flat_keys(OmegaConf.to_container(base, resolve=False)))
        except Exception:
            keys = []
        return UserError(
            f"unknown config key '{key}'{suggest(key, keys)}; to add a new key write +{key}=..."
        )
    first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
    return UserError(f"bad override: {first}")


def compose(recipe: str = "default", overrides: Iterable[str] = ()) -> DictConfig:
    """The resolved, validated config of `recipe` with `key=value` overrides applied."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException as OCE

    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override '{o}' is not key=value (e.g. budget.steps=100)")
    try:
        raw = _compose_raw(recipe, overrides)
    except (HydraException, OCE) as err:
        raise _override_error(recipe, overrides, err) from None
    # `+new.key=value` adds keys the schema does not know; keep them beside the checked config.
    extras = {o[1:].split("=", 1)[0] for o in overrides if o.startswith("+") and not o.startswith("++")}
    return validate(raw, extras)


def _compose_eval_raw(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("eval", overrides=list(overrides))


def compose_eval(overrides: Iterable[str] = ()):
    """`lmtk eval`'s config (conf/eval.yaml + conf/eval/<suite>.yaml) with overrides applied,
    checked: an lmtk.eval.Plan (the suites in order, each one's Config)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException as OCE

    from lmtk.eval import plan

    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override '{o}' is not key=value (e.g. suite=ppl); run names come before the overrides")
    try:
        raw = _compose_eval_raw(overrides)
    except (HydraException, OCE) as err:
        raise _override_error("eval", overrides, err, defaults=lambda: _compose_eval_raw([])) from None
    return plan(raw)


def validate(raw: DictConfig, extras: Iterable[str] = ()) -> DictConfig:
    """Merge onto the typed schema (unknown keys, wrong types) and check the choices."""
    added = {}
    OmegaConf.set_struct(raw, False)
    sections = {f.name for f in dataclasses.fields(Config)}
    for key in extras:
        if key.split(".")[0] in sections:  # `+new.key` adds sections of the user's own, never keys lmtk ignores
            top = key.split(".")[0]
            known = [f"{top}.{k}" for k in _flat_keys(OmegaConf.to_container(OmegaConf.structured(Config))[top])] \
                if isinstance(OmegaConf.select(OmegaConf.structured(Config), top), DictConfig) else [top]
            raise UserError(f"unknown config key '{key}'{suggest(key, known)}")
        added[key] = OmegaConf.select(raw, key)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(raw, parent) if parent else raw
        node.pop(leaf, None)
        while parent and not len(OmegaConf.select(raw, parent)):  # +new.key=1: drop the emptied new section
            parent, _, leaf = parent.rpartition(".")
            (OmegaConf.select(raw, parent) if parent else raw).pop(leaf)
    try:
        OmegaConf.resolve(raw)
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        detail = str(getattr(err, "msg", err)).splitlines()[0]
        if "not in struct" in detail or "Key '" in detail and "not" in detail:
            keys = list(_flat_keys(OmegaConf.to_container(OmegaConf.structured(Config))))
            raise UserError(f"unknown config key '{key}'{suggest(key, keys)}") from None
        raise UserError(f"invalid value for {key}: {detail}") from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(f"{key}={value} is not one of: {', '.join(allowed)}{suggest(str(value), allowed)}")
    _check(cfg)
    OmegaConf.set_struct(cfg, False)
    for key, value in added.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _check_model(cfg) -> None:
    """model.mixer against its mixer's Config (defaults filled in), model.layers against n_layers, model.moe
    against the MoE's Config."""
    from lmtk.models.mixers import layer_mixers, mixer_config

    m = cfg.model
    knobs = m.mixer if isinstance(m.mixer, str) else OmegaConf.to_container(m.mixer, resolve=True)
    # lmtk finetune: the model is the base's (the recipe's a placeholder); model.mixer.state_expand
    # widens the base's recurrent state (finetune/expand.py), checked against the base there
    finetune = cfg.get("base") is not None or recipe_command(cfg.recipe) == "finetune"
    expand = knobs.pop("state_expand", None) if finetune and isinstance(knobs, dict) else None
    mixer = mixer_config({"name": knobs} if isinstance(knobs, str) else knobs)
    if expand is not None and expand != 1:  # a request, read by lmtk finetune before the base's model replaces this one
        mixer["state_expand"] = expand
    layers = m.layers if m.layers is None or isinstance(m.layers, str) else list(m.layers)
    # lmtk distill: the student has its teacher's layers, so the pattern's length is checked against them later
    n_layers = m.n_layers if cfg.get("teacher") is None or layers is None else len(layers if not isinstance(layers, str) else layers.replace(" ", ""))
    layer_mixers(layers, n_layers, mixer["name"])
    OmegaConf.set_struct(cfg, False)
    m.mixer = mixer
    if m.get("moe") is not None:  # model.moe.* against models/moe.py's Config (whatever model.mlp: typos fail early)
        from lmtk.models.moe import moe_config

        m.moe = moe_config(OmegaConf.to_container(m.moe, resolve=True))
    OmegaConf.set_struct(cfg, True)


def _check(cfg) -> None:
    _check_model(cfg)
    b = cfg.budget
    if all(v is None for v in (b.steps, b.tokens, b.hours, b.epochs)):
        raise UserError("no budget: set one of budget.steps, budget.tokens, budget.hours, budget.epochs")
    for k in ("steps", "tokens", "hours", "epochs"):
        v = b[k]
        if v is not None and v <= 0:
            raise UserError(f"budget.{k}={v} must be positive")
    t = cfg.train
    if t.micro_batch_size <= 0 or t.batch_size <= 0:
        raise UserError("train.batch_size and train.micro_batch_size must be positive")
    if t.batch_size % t.micro_batch_size:
        raise UserError(
            f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}"
        )
    m = cfg.model
    if m.d_model % m.n_heads:
        raise UserError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.n_kv_heads is not None and (m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads):
        raise UserError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    if m.window is not None and m.window < 1:
        raise UserError(f"model.window={m.window} must be at least 1 (null: attend to every earlier key)")
    if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
        raise UserError("rope needs an even head dimension (model.d_model / model.n_heads)")
    if m.positions in ("learned", "sinusoidal") and cfg.data.seq_len > m.max_seq_len:
        # both position tables have max_seq_len rows
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.parametrization == "mup" and (m.mup_base_width is None or m.mup_base_width < 1):
        raise UserError(f"model.parametrization=mup needs model.mup_base_width >= 1, the d_model the learning rate "
                        f"was tuned at (got {m.mup_base_width})")
    if m.norm_eps is not None and m.norm_eps <= 0:
        raise UserError(f"model.norm_eps={m.norm_eps} must be positive (or null: the norm's usual)")
    if cfg.objective.head_chunk < 1:
        raise UserError(f"objective.head_chunk={cfg.objective.head_chunk} must be at least 1")
    if not 0 < cfg.objective.mask_rate < 1:
        raise UserError("objective.mask_rate must be between 0 and 1")
    o = cfg.objective
    if o.name == "mtp":
        from lmtk.objectives.mtp import check_knobs

        check_knobs(o.mtp_k, list(o.mtp_weights), cfg.data.seq_len)
    if o.name == "rts":
        from lmtk.objectives.rts import check_knobs

        check_knobs(o.replace_rate, o.lm_weight)
    if not 0 < cfg.val.mask_rate < 1:
        raise UserError("val.mask_rate must be between 0 and 1")
    if cfg.data.seq_len < 2:
        raise UserError("data.seq_len must be at least 2")
    for key in ("logger.every",):
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1")
    for key in ("val.every", "checkpoint.every", "checkpoint.keep", "val.tokens"):
        if OmegaConf.select(cfg, key) < 0:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} must not be negative")
    sc = cfg.search
    for key, low in (("batches", 1), ("train_steps", 0), ("max_candidates", 1)):
        if sc[key] < low:
            raise UserError(f"search.{key}={sc[key]} must be at least {low}")
    if sc.top is not None and sc.top < 1:
        raise UserError(f"search.top={sc.top} must be at least 1 (null: every candidate trains)")
    r = cfg.resume
    if isinstance(r, bool) and r or not isinstance(r, (bool, str)) and r is not None:
        raise UserError(f"resume={str(r).lower()} is not a choice: resume=auto continues run.name from its latest checkpoint, "
                        "resume=PATH starts from a checkpoint (or run) directory")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
