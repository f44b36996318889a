"""The `lmtk` command: errors as one line on stderr (exit 2, no traceback), and the listing commands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import helpers

TRAIN = [*helpers.TINY, "budget.steps=1"]


def _tree(path):
    """{relative path: (sha256, mtime_ns)} of every file under path."""
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


ERROR_CASES = {
    "unknown-command": (["frobnicate"], "frobnicate"),
    "unknown-recipe": (["train", "cramming-brt", "budget.steps=1"], "cramming-bert"),
    "typo-key": (["train", "budget.step=3"], "budget.steps"),
    "bad-type": (["train", "budget.steps=ten"], "budget.steps"),
    "bad-option": (["config", "model=gpt3"], "small-gpt"),
    "missing-file": (["train", "data=text", "data.train=/nonexistent.txt", *TRAIN], "/nonexistent.txt"),
    "empty-file": (["train", "data=text", "data.train={tmp}/empty.txt", *TRAIN], "empty"),
    "binary-file": (["train", "data=text", "data.train={tmp}/blob.txt", *TRAIN], "binary"),
    "existing-run": (["train", *TRAIN, "run.name=clm"], "already exists"),
    "cuda": (["train", "device=cuda", *TRAIN], "cuda"),
}


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, shared_cache, clm_run):
    """Run every error case as `python -m lmtk ...`, all at once (they are independent)."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "empty.txt").write_text("")
    (tmp / "blob.txt").write_bytes(bytes(range(256)) * 64)
    runs = tmp / "runs"
    shutil.copytree(clm_run, runs / "clm")
    before = _tree(runs / "clm")
    env = dict(os.environ, LMTK_RUNS=str(runs), LMTK_CACHE=str(shared_cache), COLUMNS="200")
    env.pop("LMTK_DEBUG", None)
    procs = {}
    for name, (args, _) in ERROR_CASES.items():
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "lmtk", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp
        )
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out, runs, before


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_error_is_one_line(cli_errors, case):
    results, _, _ = cli_errors
    r = results[case]
    needle = ERROR_CASES[case][1]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert r.returncode == 2, (r.returncode, r.stderr)


def test_existing_run_is_untouched(cli_errors):
    _, runs, before = cli_errors
    assert _tree(runs / "clm") == before


def test_failed_runs_leave_no_run_directory(cli_errors):
    _, runs, _ = cli_errors
    assert not [p for p in runs.iterdir() if p.name != "clm"]


def test_debug_env_shows_the_traceback(lmtk_env):
    r = helpers.lmtk("config", "budget.step=3", env={"LMTK_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr


# ---- listing commands ---------------------------------------------------------------------


def test_commands_start_without_importing_dynamo():
    """torch._dynamo is ~1.1 s of start-up: every command (and each one-line error) would pay it.
    It is imported by torch.compile and by the first MoE built, never by the CLI and the loop."""
    code = ("import sys, lmtk.cli, lmtk.train.pretrain, lmtk.eval.command, lmtk.finetune.run, lmtk.distill.run, lmtk.search; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_help_lists_commands():
    res = helpers.cli("--help")
    assert res.exit_code == 0
    for cmd in ("train", "recipes", "config", "runs", "eval"):
        assert cmd in res.output


def test_recipes_lists_all_with_descriptions():
    from lmtk.config import recipe_names

    res = helpers.cli("recipes")
    assert res.exit_code == 0
    for name in recipe_names():
        assert name in res.output
    assert "Crammed BERT" in res.output


def test_config_prints_resolved_yaml():
    res = helpers.cli("config", "cramming-bert", "budget.steps=10")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["model"]["d_model"] == 768 and cfg["budget"]["steps"] == 10 and cfg["objective"]["name"] == "mlm"
    assert "d_model: 768" in res.output and "${" not in res.output


def test_config_subprocess_prints_yaml_on_stdout(lmtk_env):
    r = helpers.lmtk("config", "cramming-bert", "budget.steps=10")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["model"]["d_model"] == 768


def test_runs_lists_a_run_with_its_status(clm_run):
    res = helpers.cli("runs", "--root", str(clm_run.parent))
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if " clm " in line)
    assert "done" in line and "train" in line and "60" in line
    rows = json.loads(helpers.cli("runs", "--root", str(clm_run.parent), "--json").output)
    assert [(r["name"], r["status"], r["steps"]) for r in rows] == [("clm", "done", 60)]
    assert rows[0]["val_loss"] == helpers.info(clm_run)["summary"]["val/loss"]


def test_runs_uses_lmtk_runs_env(clm_run, monkeypatch):
    monkeypatch.setenv("LMTK_RUNS", str(clm_run.parent))
    rows = json.loads(helpers.cli("runs", "--json").output)
    assert [r["name"] for r in rows] == ["clm"]


def test_runs_on_missing_root_is_empty(tmp_path):
    res = helpers.cli("runs", "--root", str(tmp_path / "none"), "--json")
    assert res.exit_code == 0 and json.loads(res.output) == []


@pytest.mark.parametrize("positions", ["sinusoidal", "rope", "learned"])
def test_generate_past_max_seq_len(lmtk_env, positions):
    """Generating more tokens than the model's max_seq_len slides a window of max_seq_len tokens
    (a sinusoidal table has max_seq_len rows: it used to fail in the first forward past them)."""
    helpers.train(*TRAIN, f"model.positions={positions}", "model.max_seq_len=32", f"run.name=p-{positions}")
    res = helpers.cli("generate", f"p-{positions}", "-p", "def main(", "-n", "60", "--temperature", "0")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("def main(") and len(res.output) > 40
