"""`lmtk eval`: one validation path (ppl on a run's own val data == its logged val/*), bits-per-byte
by hand, minimal pairs on a constructed model, results files, tables over several runs, the config."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from lmtk.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRAIN = [*helpers.TINY, "budget.steps=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache) -> Path:
    """Two finished tiny runs: 'a' (CLM, checkpoint and validation at step 2) and 'b' (MLM)."""
    root = tmp_path_factory.mktemp("eval-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(root))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*TRAIN, "run.name=a", "checkpoint.every=2", "val.every=2")
        helpers.train(*TRAIN, "objective=mlm", "run.name=b")
    helpers.reset_console()
    return root


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    import make_pairs

    out = tmp_path_factory.mktemp("pairs")
    make_pairs.generate(out, n=6, seed=0)
    return out


def evaluate(root, *args):
    res = helpers.cli("eval", *map(str, args), f"root={root}")
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def last_val(run: Path, step: int | None = None) -> dict:
    rows = [m for m in helpers.metrics(run) if "val/loss" in m and (step is None or m["step"] == step)]
    return rows[-1]


# ---- one path: training's validation == lmtk eval suite=ppl --------------------------------


@pytest.mark.parametrize("name", ["a", "b"])
def test_ppl_on_the_runs_own_val_equals_training_validation(runs, name):
    evaluate(runs, name, "suite=ppl")
    got = json.loads((runs / name / "eval" / "ppl.json").read_text())
    val = last_val(runs / name)
    assert got["scores"]["loss"] == val["val/loss"] and got["scores"]["bpb"] == val["val/bpb"]  # exactly
    for k in ("clm_loss", "clm_bpb", "mlm_loss", "mlm_bpb"):
        assert got["scores"][k] == val[f"val/{k}"]
    assert list(got["scores"])[0] == "bpb" == got["headline"]
    assert got["scores"]["ppl"] == pytest.approx(math.exp(val["val/loss"]))
    assert got["samples"] == 2048 and got["seed"] == 12345 and got["step"] == 4
    assert got["checkpoint"].endswith("checkpoints/final") and got["lmtk_version"] and got["wall_seconds"] >= 0


def test_a_checkpoint_inside_a_run_writes_into_the_run(runs):
    ckpt = runs / "a" / "checkpoints" / "step-000002"
    evaluate(runs, ckpt, "suite=ppl")
    got = json.loads((runs / "a" / "eval" / "ppl.json").read_text())
    assert got["checkpoint"] == str(ckpt.resolve()) and got["step"] == 2 and got["target"] == "a/step-000002"
    assert got["scores"]["loss"] == last_val(runs / "a", step=2)["val/loss"]  # the validation logged at step 2


def test_a_copied_checkpoint_writes_beside_itself(runs, tmp_path):
    copy = tmp_path / "mine" / "final"
    shutil.copytree(runs / "b" / "checkpoints" / "final", copy)
    evaluate(runs, copy, "suite=ppl", "ppl.tokens=1024")
    got = json.loads((copy / "eval" / "ppl.json").read_text())
    assert got["samples"] == 1024 and got["config"]["tokens"] == 1024


# ---- bits-per-byte by hand -----------------------------------------------------------------


def _uniform_target(runs, V=None):
    from lmtk.data.tokenizer import Tokenizer
    from lmtk.eval.target import Target
    from lmtk.models import LanguageModel, ModelConfig

    tok = Tokenizer.from_file(runs / "a" / "tokenizer.json")
    V = V or tok.vocab_size
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, positions="rope")).eval()
    model.logits = lambda h: torch.zeros(*h.shape[:-1], V)  # every token equally likely
    return Target(model=model, tokenizer=tok, model_cfg=model.cfg, meta={"objective": {"name": "clm", "masked_shift": 0}},
                  device=torch.device("cpu"), dtype=torch.float32, name="uniform", seed=0, run_dir=None,
                  checkpoint=runs / "a", run_cfg=None)


def test_bpb_of_a_uniform_model_by_hand(runs, tmp_path):
    from lmtk.eval import ppl
    from lmtk.schema import DataCfg
    from omegaconf import OmegaConf

    docs = ["def main():\n    return 1  # ünïcode\n", "import os\nprint(os.getcwd())" * 3]
    f = tmp_path / "held.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    target = _uniform_target(runs, V=1031)  # more ids than the tokenizer has
    data = OmegaConf.merge(OmegaConf.structured(DataCfg), {"source": "text", "val": str(f)})
    out = ppl.run(target, ppl.Config(data=data, window=16, stride=5))
    tokens = sum(len(target.tokenizer.encode(d)) + 1 for d in docs)  # each document and its [SEP]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert out["samples"] == tokens
    assert out["scores"]["loss"] == pytest.approx(math.log(1031), rel=1e-6)
    assert out["scores"]["bpb"] == pytest.approx(math.log(1031) * tokens / (math.log(2) * nbytes), rel=1e-6)
    assert out["scores"]["ppl"] == pytest.approx(1031, rel=1e-5)
    assert out["scores"]["clm_loss"] == pytest.approx(math.log(1031), rel=1e-6)  # the packed reading too


def test_ppl_token_budget_cuts_the_file(runs, tmp_path):
    f = tmp_path / "held.txt"
    f.write_text("hello world, " * 200)
    res = evaluate(runs, "a", "suite=ppl", "data=text", f"data.val={f}", "ppl.tokens=100")
    got = json.loads((runs / "a" / "eval" / "ppl.json").read_text())
    assert got["samples"] == 100 and got["config"]["data"]["val"] == str(f)
    assert "sliding window" in res.output


# ---- pairs -----------------------------------------------------------------------------------


def _favouring(target, words: str, boost: float = 12.0):
    """Edit the head so the tokens of `words` are far more likely than any other."""
    ids = target.tokenizer.encode(words)
    bias = torch.zeros(target.model.cfg.vocab_size)
    bias[ids] = boost
    real = type(target.model).logits

    target.model.logits = lambda h: real(target.model, h) + bias
    return target


@pytest.mark.parametrize("method", ["causal", "pll"])
def test_pairs_prefer_the_more_probable_sentence(runs, tmp_path, method):
    from lmtk.eval import pairs
    from lmtk.eval.target import load

    f = tmp_path / "p.jsonl"
    rows = [{"sentence_good": "the the the", "sentence_bad": "zq xv zq", "UID": "u1", "linguistics_term": "t"},
            {"sentence_good": "zq xv zq", "sentence_bad": "the the the", "UID": "u2", "linguistics_term": "t"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = _favouring(load("b", root=runs), "the the the")
    out = pairs.run(target, pairs.Config(path=str(f), method=method))
    assert out["scores"]["paradigm/u1"] == 1.0 and out["scores"]["paradigm/u2"] == 0.0
    assert out["scores"]["accuracy"] == 0.5 and out["samples"] == 2
    assert [r["paradigm"] for r in out["rows"]] == ["u1", "u2"]


def test_pairs_method_auto_follows_the_objective(runs):
    from lmtk.eval.pairs import choose_method
    from lmtk.eval.target import load

    assert choose_method(load("a", root=runs), "auto") == "causal"
    assert choose_method(load("b", root=runs), "auto") == "pll"


def test_pairs_results_written_reread_and_compared_over_two_runs(runs, pairs_dir):
    from lmtk.eval import results

    res = evaluate(runs, "a", "b", "suite=[pairs,ppl]", f"pairs.path={pairs_dir}", "pairs.limit=3")
    for name in ("a", "b"):
        got = results.read(runs / name / "eval")
        assert set(got) >= {"pairs", "ppl"}
        p = got["pairs"]
        assert p["samples"] == 15 and p["config"]["limit"] == 3 and len(p["rows"]) == 5
        assert results.headline(p) == ("accuracy", p["scores"]["accuracy"])
        assert 0 <= p["scores"]["accuracy"] <= 1
        assert p["scores"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in p["rows"]]))
    assert "pairs: accuracy by paradigm" in res.output and "gen_subject_verb_agreement" in res.output
    header = next(line for line in res.output.splitlines() if "score" in line and " a " in line)
    assert " b " in header  # the runs side by side
    listing = json.loads(helpers.cli("runs", "--root", str(runs), "--json").output)
    ev = {r["name"]: r["eval"] for r in listing}
    assert set(ev["a"]) >= {"pairs", "ppl"} and ev["a"]["pairs"]["score"] == "accuracy"
    table = helpers.cli("runs", "--root", str(runs)).output
    assert "pairs accuracy=" in table and "ppl bpb=" in table


def test_make_pairs_is_seeded_and_blimp_shaped(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import make_pairs

    a = make_pairs.generate(tmp_path / "a", n=20, seed=3)
    b = make_pairs.generate(tmp_path / "b", n=20, seed=3)
    assert len(a) >= 5 and [p.read_text() for p in a] == [p.read_text() for p in b]
    row = json.loads(a[0].read_text().splitlines()[0])
    assert {"sentence_good", "sentence_bad", "UID", "linguistics_term", "field"} <= set(row)
    assert row["sentence_good"] != row["sentence_bad"]


# ---- the config ------------------------------------------------------------------------------


def test_eval_config_defaults_and_overrides():
    from lmtk.config import compose_eval

    plan = compose_eval([])
    assert plan.suites == ["ppl"] and plan.configs["ppl"].tokens is None
    plan = compose_eval(["suite=[ppl,pairs]", "ppl.tokens=512", "pairs.limit=3", "seed=7", "data=text", "data.val=x.txt"])
    assert plan.suites == ["ppl", "pairs"] and plan.configs["ppl"].tokens == 512 and plan.configs["pairs"].limit == 3
    assert plan.top.seed == 7 and plan.configs["ppl"].data.val == "x.txt"


def test_every_eval_conf_composes_and_matches_its_suite_config():
    import dataclasses

    from omegaconf import OmegaConf

    from lmtk.config import compose_eval, conf_dir
    from lmtk.eval import available, suite_module

    files = sorted((conf_dir() / "eval").glob("*.yaml"))
    assert {"ppl", "pairs"} <= {f.stem for f in files}
    for f in files:
        if not available(f.stem):
            continue
        plan = compose_eval([f"suite={f.stem}"])
        fields = {x.name for x in dataclasses.fields(suite_module(f.stem).Config)} - {"data"}
        assert set(OmegaConf.load(f)) == fields, f.stem  # the yaml holds exactly the Config's keys
        assert dataclasses.asdict(plan.configs[f.stem]) == {**dataclasses.asdict(suite_module(f.stem).Config()),
                                                             **dict(OmegaConf.load(f))}


@pytest.mark.parametrize("args,match", [
    (["ppl.tokns=5"], r"unknown config key 'ppl.tokns' \(did you mean: ppl.tokens"),
    (["+ppl.tokns=5"], r"unknown config key 'ppl.tokns' \(did you mean: ppl.tokens"),
    (["suite=ppll"], r"unknown suite 'ppll' \(did you mean: ppl"),
    (["suite=[ppl,pairz]"], r"unknown suite 'pairz' \(did you mean: pairs"),
    (["sute=ppl"], r"unknown config key 'sute'"),
    (["ppl.tokens=many"], r"invalid value for ppl.tokens"),
    (["precision=fp8"], r"precision=fp8 is not one of"),
    (["data=txt"], r"unknown option 'txt' for data"),
])
def test_eval_config_errors(args, match):
    from lmtk.config import compose_eval

    with pytest.raises(UserError, match=match):
        compose_eval(args)


def test_a_suite_whose_module_is_missing_says_so(monkeypatch):
    from lmtk.config import compose_eval
    from lmtk.eval import SUITES, available

    assert all(available(s) for s in SUITES)  # every registered suite ships
    monkeypatch.setitem(SUITES, "speed", "lmtk.eval.not_here")
    with pytest.raises(UserError, match="suite speed is not available yet"):
        compose_eval(["suite=speed"])


def test_masked_readings_refused_for_a_causal_only_run(lmtk_env, tmp_path):
    helpers.train(*helpers.TINY, "budget.steps=1", "model/mixer=gla", "run.name=g")
    (tmp_path / "p.jsonl").write_text(json.dumps({"sentence_good": "a b", "sentence_bad": "b a"}) + "\n")
    for args, match in ((["ppl.pll=true"], "ppl.pll=true needs a masked"), (["suite=pairs", "pairs.method=pll", f"pairs.path={tmp_path}"],
                                                                              "pairs.method=pll needs a masked")):
        res = helpers.cli("eval", "g", *args)
        assert res.exit_code != 0 and isinstance(res.exception, UserError) and match in str(res.exception)
    res = helpers.cli("eval", "g", "suite=ppl")  # the causal reading, and the note says so
    assert res.exit_code == 0, res.output
    got = json.loads((lmtk_env.runs / "g" / "eval" / "ppl.json").read_text())
    assert "mlm_loss" not in got["scores"] and any("causal reading only" in n for n in got["notes"])
    assert got["scores"]["loss"] == last_val(lmtk_env.runs / "g")["val/loss"]


def test_rows_of_several_runs_are_keyed_by_all_their_leading_columns():
    """mqar's cells are (seq_len, kv_pairs): two runs side by side keep one row per cell, not
    one per seq_len (which kept only the last kv's value)."""
    from rich.console import Console

    from lmtk.eval.results import tables

    def payload(name, accs):
        rows = [{"seq_len": 64, "kv_pairs": kv, "accuracy": a, "steps": 400} for kv, a in zip((4, 8), accs)]
        return {"suite": "mqar", "target": name, "scores": {"accuracy": sum(accs) / 2}, "samples": 2, "notes": [], "rows": rows}

    t = tables([payload("a", [0.9, 0.1]), payload("b", [0.3, 0.2])])[-1]
    assert [c.header for c in t.columns] == ["seq_len", "kv_pairs", "a", "b"]
    assert t.row_count == 2
    out = Console(width=120, record=True)
    out.print(t)
    text = out.export_text()
    assert "0.9000" in text and "0.1000" in text and "0.3000" in text
