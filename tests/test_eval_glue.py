"""suite=glue: each task fine-tuned through `lmtk finetune` (one hyperparameter set), best epoch
per task, their average; bad task names are one-line errors before any model loads."""

from __future__ import annotations

import json

import pytest

import helpers
from test_finetune import write_task


@pytest.fixture(scope="module")
def bert(tmp_path_factory, shared_cache):
    root = tmp_path_factory.mktemp("glue")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(root / "runs"))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*helpers.TINY, "budget.steps=5", "objective=mlm", "run.name=bert")
    helpers.reset_console()
    task = root / "senti"
    task.mkdir()
    write_task(task / "train.tsv", 240, 0)
    write_task(task / "dev.tsv", 60, 1)
    return root / "runs" / "bert", task


def test_glue_suite_finetunes_each_task_and_averages(bert, lmtk_env):
    run, task = bert
    res = helpers.cli("eval", run, "suite=glue", f"glue.tasks=[{task}]", "glue.overrides=['train.lr=2e-3','logger.every=50']")
    assert res.exit_code == 0, res.output[-3000:]
    out = json.loads((run / "eval" / "glue.json").read_text())
    scores = out["scores"]
    assert list(scores)[0] == "average" and scores["average"] == scores["senti/score"] == scores["senti/accuracy"]
    assert scores["average"] > 0.75  # chance is 0.5: the fine-tuned encoder learned the task
    assert out["samples"] == 60
    ft = run.parent / "bert-glue-senti"  # the task's own fine-tuning run, child of the checkpoint
    meta = json.loads((ft / "run.json").read_text())
    assert meta["kind"] == "finetune" and meta["status"] == "done"
    assert json.loads((ft / "eval" / "finetune.json").read_text())["best"]["score"] == scores["senti/score"]


@pytest.mark.parametrize("args, message", [
    (["glue.tasks=[sst22]"], "is neither a GLUE task"),
    (["glue.tasks=[]"], "names no task"),
    (["glue.peft=lora2"], "glue.peft=lora2 is not one of: full, bitfit, lora"),
    (["glue.tasks=[{empty}]"], "needs train{.tsv,.csv,.jsonl} and dev"),
])
def test_glue_bad_input_is_one_line(bert, lmtk_env, tmp_path, args, message):
    run, _ = bert
    (tmp_path / "empty").mkdir()
    res = helpers.cli("eval", run, "suite=glue", *[a.format(empty=tmp_path / "empty") for a in args])
    from lmtk.errors import UserError

    assert isinstance(res.exception, UserError), res.output  # the CLI prints it as one line, exit 2
    assert message in str(res.exception) and "\n" not in str(res.exception)
    assert not (run / "eval" / "glue.json").exists() or "average" in (run / "eval" / "glue.json").read_text()
