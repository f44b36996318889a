"""What a finished run leaves in its directory (the shared tiny CLM run)."""

from __future__ import annotations

import hashlib
import json

import torch
import yaml

import helpers
from lmtk.data.tokenizer import Tokenizer
from lmtk.models import ModelConfig, build_model
from lmtk.checkpoint import load_state, load_weights
from lmtk.checkpoint import verify as verify_checkpoint


def test_run_json(clm_run):
    info = helpers.info(clm_run)
    assert info["status"] == "done" and info["name"] == "clm" and info["kind"] == "train" and info["recipe"] == "default"
    assert {"lmtk", "python", "torch"} <= set(info["versions"])
    assert info["versions"]["torch"] == torch.__version__
    assert "git_sha" in info
    assert info["device"] == "cpu (float32)"
    assert isinstance(info["command"], str) and info["command"]
    assert info["created"] <= info["updated"]
    s = info["summary"]
    assert s["steps"] == 60 and s["tokens"] == 60 * 16 * 64
    for k in ("val/loss", "val/bpb", "unigram_loss", "unigram_bpb", "train_loss", "params", "tok/s"):
        assert isinstance(s[k], (int, float)), k


def test_config_yaml_is_resolved(clm_run):
    text = (clm_run / "config.yaml").read_text()
    assert "${" not in text  # interpolations resolved (run.root was ${oc.env:LMTK_RUNS,runs})
    cfg = yaml.safe_load(text)
    assert cfg["run"]["name"] == "clm"
    assert cfg["run"]["root"] == str(clm_run.parent)
    assert cfg["budget"]["steps"] == 60 and cfg["budget"]["hours"] is None
    assert cfg["model"]["vocab_size"] == 1024  # filled from the tokenizer (1000 padded to 64)
    # the stored config composes again into the same run (reproducibility)
    from omegaconf import OmegaConf

    from lmtk.config import validate

    again = validate(OmegaConf.create(text))
    assert OmegaConf.to_container(again) == cfg


def test_overrides_yaml(clm_run):
    ov = yaml.safe_load((clm_run / "overrides.yaml").read_text())
    assert ov["recipe"] == "default"
    assert "budget.steps=60" in ov["overrides"] and "run.name=clm" in ov["overrides"]
    assert ov["overrides"][: len(helpers.QUALITY)] == helpers.QUALITY


def test_tokenizer_and_model_json(clm_run):
    tok = Tokenizer.from_file(clm_run / "tokenizer.json")
    assert 256 < tok.vocab_size <= 1000
    m = json.loads((clm_run / "model.json").read_text())
    assert m["d_model"] == 64 and m["n_layers"] == 2 and m["vocab_size"] == 1024 and m["positions"] == "rope"
    assert ModelConfig.from_dict(m).vocab_size >= tok.vocab_size


def test_metrics_jsonl(clm_run):
    rows = helpers.metrics(clm_run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(10, 61, 10))  # logger.every=10
    for r in train:
        assert {"lr", "grad_norm", "tok/s", "tokens", "time"} <= set(r)
    assert [s for s, _ in helpers.val_losses(clm_run)] == [0, 60]
    # the summary's val loss is the last validation
    assert helpers.info(clm_run)["summary"]["val/loss"] == helpers.val_losses(clm_run)[-1][1]


def test_final_checkpoint(clm_run):
    final = clm_run / "checkpoints" / "final"
    files = {"model.safetensors", "state.pt", "tokenizer.json", "config.yaml"}
    assert {p.name for p in final.iterdir()} == files | {"meta.json"}
    meta = json.loads((final / "meta.json").read_text())
    for name, digest in meta["checksums"].items():
        assert hashlib.sha256((final / name).read_bytes()).hexdigest() == digest
    assert set(meta["checksums"]) == files
    # it stands alone: the run's tokenizer and config travel with it
    assert (final / "tokenizer.json").read_text() == (clm_run / "tokenizer.json").read_text()
    assert (final / "config.yaml").read_text() == (clm_run / "config.yaml").read_text()
    assert meta["step"] == 60 and meta["objective"] == {"name": "clm", "masked_shift": 0} and meta["tag"] == "final"
    assert meta["model"] == json.loads((clm_run / "model.json").read_text())
    assert verify_checkpoint(final)["step"] == 60
    # the weights load (strictly) into the model described by model.json
    model = build_model(ModelConfig.from_dict(meta["model"]))
    load_weights(model, final)
    state = load_state(final)
    assert state["train"]["step"] == 60 and "optimizer" in state
    # no step checkpoints (checkpoint.every=0), no leftovers
    assert sorted(p.name for p in (clm_run / "checkpoints").iterdir()) == ["final"]
    assert not (clm_run / ".lock").exists()
    assert not [p for p in clm_run.rglob("*") if ".tmp" in p.name or p.name.startswith(".old")]


def test_checksum_mismatch_is_detected(clm_run, tmp_path):
    import shutil

    import pytest

    from lmtk.errors import UserError

    copy = tmp_path / "final"
    shutil.copytree(clm_run / "checkpoints" / "final", copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        b = f.read(1)
        f.seek(-8, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(UserError, match="checksum"):
        verify_checkpoint(copy)


def test_a_copied_checkpoint_stands_alone(clm_run, tmp_path):
    """A checkpoint directory copied away from its run gives the same generation by path."""
    import shutil

    elsewhere = tmp_path / "elsewhere" / "final"
    shutil.copytree(clm_run / "checkpoints" / "final", elsewhere)
    args = ["-p", "def main(", "-n", "20", "--temperature", "0"]
    by_run = helpers.cli("generate", str(clm_run), *args)
    shutil.rmtree(clm_run / "checkpoints" / "final")  # nothing may be read from the run any more
    shutil.copytree(elsewhere, clm_run / "checkpoints" / "final")
    by_path = helpers.cli("generate", str(elsewhere), *args)
    assert by_run.exit_code == 0 and by_path.exit_code == 0, by_path.output
    assert by_path.output == by_run.output and by_path.output.startswith("def main(")
