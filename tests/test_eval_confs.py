"""conf/eval/{mqar,passkey,speed}.yaml: the same keys and defaults as each suite's Config, and
composed by `lmtk eval`'s config (config.compose_eval) into that Config; bad knobs are one-line
errors there."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from lmtk.config import compose_eval, conf_dir
from lmtk.errors import UserError
from lmtk.eval import mqar, passkey, speed

SUITES = {"mqar": mqar, "passkey": passkey, "speed": speed}


@pytest.mark.parametrize("name", SUITES)
def test_conf_file_holds_the_config_fields_and_their_defaults(name):
    conf = OmegaConf.to_container(OmegaConf.load(conf_dir() / "eval" / f"{name}.yaml"))
    defaults = dataclasses.asdict(SUITES[name].Config())
    assert list(conf) == list(defaults)  # every knob, in the dataclass's order
    assert conf == defaults


@pytest.mark.parametrize("name", SUITES)
def test_conf_composes_into_the_suites_config(name):
    plan = compose_eval([f"suite={name}"])
    assert plan.suites == [name]
    cfg = plan.configs[name]
    assert isinstance(cfg, SUITES[name].Config) and cfg == SUITES[name].Config()


def test_overrides_reach_the_config():
    plan = compose_eval(["suite=[mqar,passkey,speed]", "mqar.grid=zoology", "mqar.kv_pairs=[4,8]", "passkey.lengths=[128]",
                         "speed.contexts=[64]"])
    assert plan.configs["mqar"].grid == "zoology" and plan.configs["mqar"].kv_pairs == [4, 8]
    assert plan.configs["passkey"].lengths == [128] and plan.configs["speed"].contexts == [64]
    cells, vocab, _, _ = mqar.cells(plan.configs["mqar"])
    assert {kv for _, kv in cells} == {4, 8} and vocab == 8192


@pytest.mark.parametrize("override,message", [
    ("mqar.grid=huge", r"mqar.grid=huge is not one of: small, zoology"),
    ("mqar.steps=0", r"mqar.steps=0 must be at least 1"),
    ("mqar.kv_pairs=[32]", r"mqar: kv_pairs=32 does not fit seq_len=64: .* lower mqar.kv_pairs or raise mqar.seq_lens"),
    ("mqar.vocab_size=16", r"mqar.vocab_size=16 is too small for kv_pairs=16: .* at least 34"),
    ("passkey.trials=0", r"passkey.trials=0 must be at least 1"),
    ("passkey.depths=[2.0]", r"passkey.depths: 2.0 is not a fraction between 0 \(start\) and 1 \(end\)"),
    ("speed.train_steps=0", r"speed.train_steps=0 must be at least 1"),
])
def test_bad_knobs_are_one_line_errors(override, message):
    suite = override.split(".")[0]
    with pytest.raises(UserError, match=message) as err:
        compose_eval([f"suite={suite}", override])
    assert "\n" not in str(err.value)
