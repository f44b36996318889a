"""Recipes and config groups compose, validate, and build a working model + objective."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lmtk.config import compose, group_options, groups, recipe_names, to_yaml
from lmtk.errors import UserError
from lmtk.models import build_model, model_config
from lmtk.objectives import build_objective

TINY_DIMS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"]
VOCAB = 300
FAKE_TOK = SimpleNamespace(vocab_size=VOCAB, mask_id=4, special_ids=[0, 1, 2, 3, 4], pad_id=0, eos_id=3)
ALL_OPTIONS = [(g, o) for g in groups() for o in group_options(g)]


def _forward_and_loss(cfg) -> float:
    """Build the model and objective of a composed config and run one forward+backward."""
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model, VOCAB))
    obj = build_objective(cfg.objective, FAKE_TOK)
    obj.attach(model)  # its own heads, if any (mtp, rts)
    L = min(cfg.data.seq_len, 32)
    batch = torch.randint(5, VOCAB, (2, L))
    loss, _ = obj.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()
    return loss.item()


def test_expected_recipes_and_groups_exist():
    assert {"default", "cramming-bert", "cramming-gpt"} <= set(recipe_names())
    assert {"model", "objective", "data", "tokenizer", "optim", "schedule", "logger"} <= set(groups())
    assert len(ALL_OPTIONS) >= 15


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_composes_and_builds(recipe):
    cfg = compose(recipe, ["budget.steps=10"])
    assert cfg.recipe == recipe
    assert cfg.budget.steps == 10
    assert cfg.description
    tiny = compose(recipe, ["budget.steps=10", *TINY_DIMS])
    assert (tiny.model.d_model, tiny.model.n_layers, tiny.model.n_heads) == (32, 2, 2)
    loss = _forward_and_loss(tiny)
    # an untrained model with small init predicts about uniformly: loss ~ log(vocab)
    assert math.isfinite(loss) and abs(loss - math.log(VOCAB)) < 1.0


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_group_option_composes_into_default(group, option):
    cfg = compose("default", [f"{group}={option}", "budget.steps=10", *TINY_DIMS])
    section = {"tokenizer": "tokenizer", "logger": "logger", "optim": "optim", "schedule": "schedule", "objective": "objective"}
    if group in section:
        assert cfg[group].name == option if group != "tokenizer" else cfg.tokenizer.kind == option
    elif group == "data":
        assert cfg.data.source == option
    elif group == "model":
        # the option's own settings arrive (e.g. positions), tiny dims override its size
        opt = OmegaConf.load(f"{_conf()}/model/{option}.yaml")
        assert cfg.model.positions == opt.positions and cfg.model.mlp == opt.mlp and cfg.model.norm == opt.norm
        assert cfg.model.d_model == 32
    loss = _forward_and_loss(cfg)
    assert math.isfinite(loss)


def _conf():
    from lmtk.config import conf_dir

    return conf_dir()


def test_recipe_settings_override_group_defaults():
    cfg = compose("cramming-bert", ["budget.steps=5"])
    assert cfg.objective.name == "mlm" and cfg.model.d_model == 768 and cfg.tokenizer.kind == "wordpiece"
    assert cfg.optim.eps == 1e-12  # the recipe's own value beats conf/optim/adamw.yaml
    assert cfg.budget.hours == 24 and cfg.budget.steps == 5


# ---- overrides --------------------------------------------------------------------------


def test_key_value_override():
    cfg = compose("default", ["train.lr=0.005", "model.d_model=96", "budget.steps=7", "resume=auto"])
    assert cfg.train.lr == 0.005 and cfg.model.d_model == 96 and cfg.budget.steps == 7 and cfg.resume == "auto"


def test_group_option_override():
    cfg = compose("default", ["model=crammed-bert", "schedule=triangle", "objective=mlm"])
    assert cfg.model.positions == "sinusoidal" and cfg.model.embedding_norm is True
    assert cfg.schedule.name == "triangle" and cfg.objective.name == "mlm"


def test_plus_cannot_add_a_key_lmtk_would_ignore():
    """+model.extra=1 used to be kept and silently ignored by the model: an unknown key in one of
    lmtk's own sections is an error like any other."""
    with pytest.raises(UserError, match="unknown config key 'model.extra'"):
        compose("default", ["+model.extra=1", "budget.steps=3"])


def test_plus_adds_new_section():
    cfg = compose("default", ["+new.key=value", "+new.other=2", "budget.steps=3"])
    assert cfg.new.key == "value" and cfg.new.other == 2
    assert "new:" in to_yaml(cfg)


def test_run_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMTK_RUNS", str(tmp_path / "elsewhere"))
    assert compose("default", ["budget.steps=1"]).run.root == str(tmp_path / "elsewhere")


# ---- errors -----------------------------------------------------------------------------


def _error(recipe, overrides) -> str:
    with pytest.raises(UserError) as e:
        compose(recipe, overrides)
    msg = str(e.value)
    assert "\n" not in msg.strip(), f"error should be one line: {msg!r}"
    return msg


def test_typo_key_suggests_right_one():
    msg = _error("default", ["budget.step=10"])
    assert "budget.step" in msg and "did you mean" in msg and "budget.steps" in msg


def test_typo_nested_model_key_suggests():
    msg = _error("default", ["model.d_modle=64"])
    assert "model.d_model" in msg.split("did you mean", 1)[1]


def test_unknown_group_option_lists_choices():
    msg = _error("default", ["model=gpt3"])
    assert "gpt3" in msg
    for option in group_options("model"):
        assert option in msg


def test_unknown_schedule_option_lists_choices():
    msg = _error("default", ["schedule=linear"])
    assert all(o in msg for o in ("constant", "cosine", "triangle"))


@pytest.mark.parametrize("override,key", [("budget.steps=abc", "budget.steps"), ("train.lr=fast", "train.lr"), ("seed=1.5", "seed")])
def test_wrong_value_type(override, key):
    msg = _error("default", [override])
    assert key in msg and "invalid value" in msg


def test_value_outside_choices():
    msg = _error("default", ["model.positions=xpos"])
    assert "learned" in msg and "rope" in msg and "alibi" in msg


def test_unknown_recipe_suggests():
    msg = _error("cramming-brt", [])
    assert "unknown recipe" in msg and "cramming-bert" in msg


def test_not_key_value():
    msg = _error("default", ["budget.steps"])
    assert "key=value" in msg


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["budget.hours=null"], "no budget"),
        (["budget.steps=-1"], "must be positive"),
        (["train.batch_size=10", "train.micro_batch_size=4"], "multiple"),
        (["model.d_model=100", "model.n_heads=3"], "divisible"),
        (["data.seq_len=4096"], "max_seq_len"),
        (["objective.mask_rate=1.5"], "mask_rate"),
        (["objective=mtp", "objective.mtp_k=0"], "objective.mtp_k=0 must be at least 1"),
        (["objective=mtp", "objective.mtp_k=128"], "below data.seq_len=128"),
        (["objective=mtp", "objective.mtp_k=2", "objective.mtp_weights=[1,1,1]"], "3 weights for objective.mtp_k=2"),
        (["objective=mtp", "objective.mtp_k=2", "objective.mtp_weights=[0,1]"], "the main head's (the first) > 0"),
        (["objective=rts", "objective.replace_rate=1.5"], "objective.replace_rate=1.5 must be between 0 and 1"),
        (["objective=rts", "objective.lm_weight=-1"], "objective.lm_weight=-1.0 must be >= 0"),
    ],
)
def test_semantic_checks(overrides, needle):
    if "max_seq_len" == needle:
        overrides = overrides + ["model.positions=learned"]
    assert needle in _error("default", overrides)


def test_recipe_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults:\n  - default\n  - _self_\nrecipe: mine\ntrain:\n  lr: 0.0042\n")
    cfg = compose(str(path), ["budget.steps=2"])
    assert cfg.recipe == "mine" and cfg.train.lr == 0.0042
    assert cfg.model == compose("default", ["budget.steps=2"]).model  # everything else from the parent recipe
    assert "not found" in _error(str(tmp_path / "missing.yaml"), [])


# ---- lmtk finetune ----------------------------------------------------------------------------


def _task_options():
    from lmtk.config import conf_dir

    return sorted(str(p.relative_to(conf_dir() / "task").with_suffix("")) for p in (conf_dir() / "task").rglob("*.yaml"))


@pytest.mark.parametrize("task", _task_options())
def test_every_task_composes_into_finetune(task):
    """Every conf/task option (glue/<name> included) composes and validates; GLUE's names and
    metrics are the ones lmtk.finetune.tasks knows."""
    from lmtk.finetune.metrics import METRICS
    from lmtk.finetune.tasks import GLUE

    cfg = compose("finetune", ["base=somewhere", f"task={task}", "task.train=x.tsv"])
    assert cfg.task.source in ("glue", "local") and all(m in METRICS for m in cfg.task.metrics)
    if task.startswith("glue/"):
        name = task.split("/")[1]
        text, pair, k, metrics, val_split = GLUE[name]
        assert (cfg.task.name, cfg.task.text, cfg.task.text_pair, list(cfg.task.metrics), cfg.task.val_split) == (
            name, text, pair, metrics, val_split)
        assert cfg.task.kind == ("regression" if k == 1 else "classification")


@pytest.mark.parametrize("method", group_options("peft"))
def test_every_peft_option_builds_on_a_task_model(method):
    from lmtk import peft
    from lmtk.finetune.model import TaskModel

    cfg = compose("finetune", ["base=somewhere", "task=glue/sst2", f"peft={method}", *TINY_DIMS])
    assert cfg.peft.method == method
    model = TaskModel(build_model(model_config(cfg.model, VOCAB)), 2, causal=True, pooling=cfg.head.pooling, dropout=cfg.head.dropout)
    peft.apply(model, cfg.peft, skip=("lm.head",))
    trainable, total = peft.count(model)
    assert 0 < trainable <= total and (trainable == total) == (method == "full")
    logits = model(torch.randint(5, VOCAB, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.bool))
    logits.sum().backward()


def test_finetune_recipe_is_crammings_protocol():
    cfg = compose("finetune", ["base=somewhere", "task=glue/sst2"])
    assert cfg.budget.epochs == 5 and cfg.train.lr == 4e-5 and cfg.train.batch_size == 16
    assert cfg.schedule.name == "cosine" and cfg.schedule.warmup == 0.1
    assert cfg.peft.method == "full" and compose("default", ["budget.steps=1"]).task.source == "none"
