"""Evaluation: training's validation (lm.py) and the `lmtk eval` suites, on one scoring core
(scoring.py).

Suite contract (every lmtk/eval/<suite>.py keeps it):

    @dataclass class Config       knobs with defaults; conf/eval/<suite>.yaml holds the same keys,
                                  overrides arrive as <suite>.<key>=value
    def run(target, cfg: Config) -> dict with
        "scores":  flat name -> float, the headline first
        "samples": int, how many items were scored
        "rows":    list of dicts, the table to print
        "notes":   list of one-line str
      (optional: "seed", the seed the numbers depend on when it is not the eval's `seed`)
    def check(cfg: Config) -> None   optional: bad input found before any model is loaded

`target` is lmtk.eval.target.Target (model in eval mode on its device, tokenizer, model_cfg,
meta, device, dtype, name, seed, run_dir, checkpoint, run_cfg). A Config field named `data`
receives the command's top-level data group (`data=text data.val=FILE`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from lmtk.errors import UserError, suggest

# suite name -> module; imported only when asked for. Modules written on other branches
# (mqar, passkey, speed: synth; harness; glue: needs `lmtk finetune`) are registered here so
# their names are known; until they are merged, asking for one says so.
SUITES = {
    "ppl": "lmtk.eval.ppl",
    "pairs": "lmtk.eval.pairs",
    "glue": "lmtk.eval.glue",
    "mqar": "lmtk.eval.mqar",
    "passkey": "lmtk.eval.passkey",
    "speed": "lmtk.eval.speed",
    "harness": "lmtk.eval.harness",
    "length": "lmtk.eval.length",
}
DEFAULT_SUITE = "ppl"


def suite_names(value) -> list[str]:
    """suite=NAME or suite=[a,b] -> the names, each checked against SUITES."""
    names = [value] if isinstance(value, str) else [str(v) for v in (value or [])]
    if not names:
        raise UserError("suite=[] names no suite; e.g. suite=ppl or suite=[ppl,pairs]")
    for n in names:
        if n not in SUITES:
            raise UserError(f"unknown suite '{n}'{suggest(n, SUITES)}; choices: {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def available(name: str) -> bool:
    return importlib.util.find_spec(SUITES[name]) is not None


def suite_module(name: str):
    if name not in SUITES:
        raise UserError(f"unknown suite '{name}'{suggest(name, SUITES)}; choices: {', '.join(SUITES)}")
    if not available(name):
        raise UserError(f"suite {name} is not available yet (its module {SUITES[name]} is not in this lmtk)")
    return importlib.import_module(SUITES[name])


@dataclass
class EvalCfg:
    """Top-level keys of `lmtk eval` (conf/eval.yaml); each suite's section is checked against
    its own Config."""

    suite: Any = DEFAULT_SUITE  # NAME or [a, b]
    root: str = "runs"  # runs directory for run names ($LMTK_RUNS or ./runs)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0  # seed of suites that draw (masking, synthetic tasks); ppl on the run's val data keeps the run's
    data: Optional[Any] = None  # data=text data.val=FILE: text for suites that take it (ppl)


@dataclass
class Plan:
    """A validated `lmtk eval` config: the suites in order and each one's Config."""

    suites: list[str]
    configs: dict = field(default_factory=dict)  # suite -> its Config instance
    top: Any = None  # the EvalCfg part (DictConfig)


def _keys(d, prefix=""):
    for k, v in d.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _keys(v, f"{prefix}{k}.")


def suite_config(name: str, section, data=None):
    """The suite's Config from its section of the composed config (unknown keys, wrong types:
    one-line errors)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    mod = suite_module(name)
    schema = OmegaConf.structured(mod.Config)
    try:
        merged = OmegaConf.merge(schema, section if section is not None else {})
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or name
        detail = str(getattr(err, "msg", err)).splitlines()[0]
        if "not in struct" in detail or "Key '" in detail and "not" in detail:
            known = [f"{name}.{k}" for k in _keys(OmegaConf.to_container(schema))]
            full = f"{name}.{key}" if not str(key).startswith(name) else key
            raise UserError(f"unknown config key '{full}'{suggest(full, known)}") from None
        raise UserError(f"invalid value for {name}.{key}: {detail}") from None
    names = {f.name for f in dataclasses.fields(mod.Config)}
    obj = OmegaConf.to_object(merged)
    if "data" in names:
        obj.data = data
    return obj


def plan(raw) -> Plan:
    """Check the composed eval config: top-level keys, the suite names, each suite's section."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lmtk.schema import CHOICES, DataCfg

    raw = raw.copy()
    OmegaConf.set_struct(raw, False)
    sections = {s: raw.pop(s) for s in list(raw.keys()) if s in SUITES}
    try:
        OmegaConf.resolve(raw)
        schema = OmegaConf.structured(EvalCfg)
        if raw.get("data") is not None:
            schema.data = OmegaConf.structured(DataCfg)
        top = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        detail = str(getattr(err, "msg", err)).splitlines()[0]
        if "not in struct" in detail or "Key '" in detail and "not" in detail:
            known = [f.name for f in dataclasses.fields(EvalCfg)] + list(SUITES)
            raise UserError(f"unknown config key '{key}'{suggest(str(key), known)}") from None
        raise UserError(f"invalid value for {key}: {detail}") from None
    for key in ("device", "precision"):
        if top[key] not in CHOICES[key]:
            raise UserError(f"{key}={top[key]} is not one of: {', '.join(CHOICES[key])}{suggest(str(top[key]), CHOICES[key])}")
    suite_value = OmegaConf.to_container(top.suite) if OmegaConf.is_config(top.suite) else top.suite
    names = suite_names(suite_value)
    configs = {n: suite_config(n, sections.get(n), top.data) for n in names}
    return Plan(suites=names, configs=configs, top=top)
