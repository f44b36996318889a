"""The user's side of the runs directory: `lmtk runs` (parent, val bpb), `runs show`, `runs
compare`, `runs rm`, `lmtk plot` and the plots written at the end of a run, shell completion.

One module-level world: a tiny teacher `t` (trained), a distilled student `s` of it (distilled),
and two runs written by hand: `f` (a finetune whose base is t's final checkpoint) and eval
results for t, so lineage and eval columns have something to show without more training."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

import helpers

TEACHER = [*helpers.TINY, "budget.steps=6", "logger.every=2", "val.every=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_cache):
    root = tmp_path_factory.mktemp("user-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(root))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*TEACHER, "run.name=t")
        res = helpers.cli("distill", "teacher=t", "model/mixer=gla", "budget.steps=4", "logger.every=1", "val.tokens=2048",
                          "run.name=s")
        assert res.exit_code == 0, res.output
    helpers.reset_console()
    # a finetune child of t's final checkpoint, written by hand (lineage through a checkpoint path)
    f = root / "f"
    shutil.copytree(root / "t", f, ignore=shutil.ignore_patterns("checkpoints", "plots"))
    info = json.loads((f / "run.json").read_text())
    info.update(name="f", kind="finetune", recipe="finetune", parents={"base": str(root / "t" / "checkpoints" / "final")})
    (f / "run.json").write_text(json.dumps(info))
    # an eval result of t
    (root / "t" / "eval").mkdir()
    (root / "t" / "eval" / "ppl.json").write_text(json.dumps({"suite": "ppl", "step": 6, "scores": {"bpb": 3.25, "loss": 5.5, "ppl": 244.7},
                                                             "headline": "bpb"}))
    return root


def _json(*args):
    res = helpers.cli(*args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _summary(run: Path) -> dict:
    return helpers.info(run)["summary"]


# ---- lmtk runs ----------------------------------------------------------------------------------


def test_runs_table_has_parent_val_bpb_and_eval(world):
    rows = {r["name"]: r for r in _json("runs", "--root", world, "--json")}
    assert rows["s"]["parent"] == "teacher t" and rows["f"]["parent"] == "base t" and rows["t"]["parent"] is None
    assert rows["s"]["val_bpb"] == _summary(world / "s")["val/bpb"]
    assert rows["t"]["eval"] == {"ppl": {"score": "bpb", "value": 3.25}}
    out = helpers.cli("runs", "--root", world).output
    line = next(line for line in out.splitlines() if line.startswith("│ s "))
    assert "distill" in line and "teacher t" in line and f"{_summary(world / 's')['val/bpb']:.4f}" in line
    assert "ppl bpb=3.250" in next(line for line in out.splitlines() if line.startswith("│ t "))


def test_runs_show_lineage_summary_eval_and_config_diff(world):
    d = _json("runs", "show", "s", "--root", world, "--json")
    assert d["kind"] == "distill" and d["parents"] == [{"role": "teacher", "run": "t", "path": str(world / "t")}]
    assert d["summary"]["steps"] == 4
    diff = {r["key"]: r for r in d["config_diff"]}
    # the distill recipe's model is small-gpt (d_model 128); the student took the teacher's 32: shown, and why
    assert diff["model.d_model"]["recipe"] == "128" and diff["model.d_model"]["run"] == "32"
    assert diff["model.d_model"]["why"] == "the teacher's architecture"
    assert diff["budget.steps"]["why"] == "override budget.steps=4" and diff["budget.steps"]["run"] == "4"
    assert "model.mixer.name" not in diff  # the distill recipe's mixer is gla already
    from lmtk.runview import _override_for

    assert _override_for("task.train", ["task=local", "task.train=x.tsv"]) == "task.train=x.tsv"  # the most specific
    assert _override_for("model.mixer.chunk", ["model/mixer=gla"]) == "model/mixer=gla"
    t = _json("runs", "show", "t", "--root", world, "--json")
    assert {(c["run"], c["role"]) for c in t["children"]} == {("s", "teacher"), ("f", "base")}
    assert t["eval"]["ppl"]["headline"] == "bpb" and t["eval"]["ppl"]["value"] == 3.25
    text = helpers.cli("runs", "show", "t", "--root", world).output
    for fragment in ("lineage", "child (its teacher)", "child (its base)", "bpb=3.2500", "model.d_model", "override model.d_model=32"):
        assert fragment in text, text


def test_runs_compare_side_by_side(world):
    d = _json("runs", "--root", world, "compare", "t", "s", "--json")
    t, s = d["runs"]
    assert (t["name"], s["name"]) == ("t", "s")
    assert t["val_loss"] == _summary(world / "t")["val/loss"] and s["val_bpb"] == _summary(world / "s")["val/bpb"]
    assert (t["steps"], s["steps"]) == (6, 4) and s["parent"] == "teacher t"
    diff = {r["key"]: r["values"] for r in d["config_diff"]}
    assert diff["model.mixer.name"] == ["attention", "gla"] and diff["budget.steps"] == ["6", "4"]
    text = helpers.cli("runs", "compare", "t", "s", "--root", world).output
    row = next(line for line in text.splitlines() if "val bpb" in line)
    assert f"{_summary(world / 't')['val/bpb']:.4f}" in row and f"{_summary(world / 's')['val/bpb']:.4f}" in row
    assert "eval ppl" in text and "bpb=3.2500" in text


def test_runs_rm_asks_and_refuses_a_running_run(world, tmp_path):
    root = tmp_path / "rm"
    for name in ("a", "b", "c"):
        shutil.copytree(world / "t", root / name, ignore=shutil.ignore_patterns("checkpoints"))
    res = helpers.cli("runs", "rm", "a", "--root", root)  # no answer: kept
    assert res.exit_code == 1 and (root / "a").is_dir()
    from typer.testing import CliRunner

    from lmtk.cli import app

    res = CliRunner().invoke(app, ["runs", "rm", "a", "--root", str(root)], input="n\n")
    assert res.exit_code == 1 and (root / "a").is_dir()
    res = CliRunner().invoke(app, ["runs", "rm", "a", "--root", str(root)], input="y\n")
    assert res.exit_code == 0 and not (root / "a").exists() and "deleted run 'a'" in res.output
    # a live writer: refused, untouched
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (root / "b" / ".lock").write_text(str(sleeper.pid))
        res = helpers.cli("runs", "rm", "b", "--yes", "--root", root)  # the message and exit status: test_errors.py
        assert f"run 'b' is running (process {sleeper.pid})" in str(res.exception) and (root / "b").is_dir()
        rows = {r["name"]: r for r in _json("runs", "--root", root, "--json")}
        assert rows["b"]["status"] == "done"
    finally:
        sleeper.kill()
        sleeper.wait()
    # the writer gone (a killed run: status running, a stale lock): removable, and listed as stale
    info = json.loads((root / "c" / "run.json").read_text())
    (root / "c" / "run.json").write_text(json.dumps({**info, "status": "running"}))
    (root / "c" / ".lock").write_text(str(sleeper.pid))
    assert {r["name"]: r["status"] for r in _json("runs", "--root", root, "--json")}["c"] == "stale"
    for name in ("b", "c"):
        assert helpers.cli("runs", "rm", name, "-y", "--root", root).exit_code == 0
    assert not any(root.iterdir())


# ---- lmtk plot ----------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_plot_one_run_into_its_plots_folder(world):
    pytest.importorskip("matplotlib")
    res = helpers.cli("plot", "t", "--x", "tokens", "--root", world)  # the axes themselves: test_plot_series_axes
    assert res.exit_code == 0, res.output
    plots = world / "t" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["lr.png", "tok_s.png", "train_loss.png", "val.png"]
    assert _png_size(plots / "train_loss.png") == (800, 450) and _png_size(plots / "val.png") == (1200, 450)


def test_plot_several_runs_overlaid_into_out(world, tmp_path):
    pytest.importorskip("matplotlib")
    res = helpers.cli("plot", "t", "s", "--out", tmp_path / "cmp", "--root", world)
    assert res.exit_code == 0, res.output
    assert {p.name: _png_size(p) for p in (tmp_path / "cmp").iterdir()} == {
        "train_loss.png": (800, 450), "lr.png": (800, 450), "tok_s.png": (800, 450), "val.png": (1200, 450)}
    res = helpers.cli("plot", "t", "s", "--root", world)
    assert res.exit_code != 0  # several runs need --out


def test_plot_series_axes(world):
    from lmtk.plot import Series
    from lmtk.runs import RunDir

    s = Series(RunDir(world / "t"), "t")
    steps = [r["step"] for r in s.val]
    assert steps == [0, 3, 6]
    tokens_per_step = 8 * 32  # train.batch_size x data.seq_len
    assert s.x(s.val, "tokens") == [st * tokens_per_step for st in steps]
    assert s.x(s.val, "step") == steps
    times = s.x(s.train + s.val, "time")
    assert min(times) >= 0 and max(times) == s.duration()


def test_plots_written_at_the_end_of_training(lmtk_env, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("LMTK_PLOTS", "1")
    helpers.train(*helpers.TINY, "budget.steps=2", "logger.every=1", "run.name=p")
    assert sorted(p.name for p in (lmtk_env.runs / "p" / "plots").iterdir()) == ["lr.png", "tok_s.png", "train_loss.png", "val.png"]


def test_a_plotting_failure_is_one_warning(world, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import lmtk.plot
    from lmtk.runs import RunDir

    def broken(*a, **k):
        raise RuntimeError("no fonts\nsecond line")

    monkeypatch.setenv("LMTK_PLOTS", "1")
    monkeypatch.setattr(lmtk.plot, "plot_runs", broken)
    lmtk.plot.after_run(RunDir(world / "s"))  # returns: the run is done whatever plotting does
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: plots not written: no fonts (lmtk plot s retries)"]


def test_plot_without_matplotlib(world, monkeypatch, capsys):
    from lmtk.cli import main
    from lmtk.plot import after_run
    from lmtk.runs import RunDir

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setenv("LMTK_PLOTS", "1")
    monkeypatch.setattr(sys, "argv", ["lmtk", "plot", "s", "--root", str(world)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: lmtk plot needs matplotlib: pip install 'lmtk[plot]'"
    after_run(RunDir(world / "s"))  # at the end of a run: nothing, silently
    assert capsys.readouterr().err == "" and not (world / "s" / "plots").exists()


# ---- shell completion ---------------------------------------------------------------------------


def _ctx(params=None, parent=None):
    return types.SimpleNamespace(params=params or {}, parent=parent)


def test_completion_callbacks(world, monkeypatch):
    from lmtk import completion as c
    from lmtk.config import recipe_names

    monkeypatch.setenv("LMTK_RUNS", str(world))
    assert c.run_names() == ["f", "s", "t"]
    assert c.complete_runs(_ctx({"names": ["t"]}), "") == ["f", "s"]
    assert c.complete_runs(_ctx({"root": "/nowhere"}), "") == []
    first = c.complete_recipe_args(_ctx(), "")
    assert set(recipe_names()) <= set(first) and "model=" in first and "model/mixer=" in first and "budget." in first
    assert "cramming-bert" not in c.complete_recipe_args(_ctx({"args": ["default"]}), "cr")  # a recipe comes first only
    assert c.complete_recipe_args(_ctx({"args": ["default"]}), "model/mixer=g") == ["model/mixer=gdn", "model/mixer=gla"]
    assert "model=gpt2" in c.complete_recipe_args(_ctx(), "model=")
    assert "task=glue/sst2" in c.override_candidates("task=glue/s") and "task/glue=" not in c.override_candidates("task")
    assert c.override_candidates("model.d_mo") == ["model.d_model="]
    assert "model.mixer." in c.override_candidates("model.m") and "model.mixer.chunk=" in c.override_candidates("model.mixer.")
    assert c.override_candidates("precision=b") == ["precision=bf16"]
    assert c.override_candidates("teacher=") == ["teacher=f", "teacher=s", "teacher=t"]
    assert c.complete_eval_args(_ctx(), "") [:3] == ["f", "s", "t"]
    assert "suite=ppl" in c.complete_eval_args(_ctx({"args": ["t"]}), "suite=")
    assert "ppl.tokens=" in c.complete_eval_args(_ctx({"args": ["t"]}), "ppl.t")


def _complete(env: dict) -> list[str]:
    p = helpers.lmtk(env={"_LMTK_COMPLETE": "complete_bash", **env})
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_completion_end_to_end_through_the_environment(world):
    runs = {"LMTK_RUNS": str(world)}
    # click's convention: COMP_WORDS / COMP_CWORD (bash has cut model/mixer=g at '=')
    assert _complete({**runs, "COMP_WORDS": "lmtk runs show ", "COMP_CWORD": "3"}) == ["f", "s", "t"]
    assert _complete({**runs, "COMP_WORDS": "lmtk train model/mixer = g", "COMP_CWORD": "4"}) == ["gdn", "gla"]
    # lmtk's bash script: the line up to the cursor; bash replaces the part after the last '='
    assert _complete({**runs, "_LMTK_COMPLETE_LINE": "lmtk distill teacher=t"}) == ["t"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_completion_bash_script(world, tmp_path):
    res = helpers.cli("completion", "bash")
    assert res.exit_code == 0 and "complete -o default -F _lmtk_completion lmtk" in res.output
    (tmp_path / "lmtk.bash").write_text(res.output)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "lmtk").write_text(f'#!/bin/sh\nexec {sys.executable} -m lmtk "$@"\n')
    (bindir / "lmtk").chmod(0o755)
    test = f"""source {tmp_path / 'lmtk.bash'}
COMP_LINE="lmtk train model/mixer=g"; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=(lmtk train model/mixer = g); COMP_CWORD=4
_lmtk_completion; echo "${{COMPREPLY[*]}}"
COMP_LINE="lmtk ru"; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=(lmtk ru); COMP_CWORD=1
_lmtk_completion; echo "${{COMPREPLY[*]}}"
"""
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", LMTK_RUNS=str(world),
               PYTHONPATH=os.pathsep.join([str(helpers.REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(["bash", "--norc", "-c", test], capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.splitlines() == ["gdn gla", "runs"], p.stderr
    for shell in ("zsh", "fish"):
        res = helpers.cli("completion", shell)
        assert res.exit_code == 0 and "_LMTK_COMPLETE=complete_" + shell in res.output
