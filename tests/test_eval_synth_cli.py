"""`lmtk eval RUN suite=[mqar,passkey,speed]` end to end on a finished tiny run: each suite's
results file, and a bad knob refused in one line before any run is loaded."""

from __future__ import annotations

import json
import sys

import pytest

import helpers


def _main(argv, capsys, monkeypatch):
    """`lmtk ARGV` through the CLI's entry point (UserError -> one line, exit 2): (exit code, stderr)."""
    from lmtk.cli import main

    monkeypatch.setattr(sys, "argv", ["lmtk", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_bad_mqar_cells_are_refused_before_loading_anything(capsys, monkeypatch):
    code, err = _main(["eval", "no-such-run", "suite=mqar", "mqar.seq_lens=[64]", "mqar.kv_pairs=[32]"], capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [
        "error: mqar: kv_pairs=32 does not fit seq_len=64: the pairs take 64 tokens and the queries 64 more "
        "(kv_pairs <= seq_len/4 = 16); lower mqar.kv_pairs or raise mqar.seq_lens"], err


ROWS = ["eval-mqar-cells-do-not-fit", "eval-mqar-vocab-too-small", "eval-mqar-grid", "eval-passkey-masked-only",
        "eval-passkey-all-past-context", "eval-passkey-length-too-short", "eval-passkey-depth", "eval-speed-seq-past-context",
        "eval-suite-knob-below-one"]


def test_the_catalogue_documents_these_rows():
    doc = (helpers.REPO / "docs" / "errors.md").read_text()
    assert not [r for r in ROWS if f"`{r}`" not in doc]


def test_the_three_suites_run_on_a_trained_run(clm_run, monkeypatch):
    monkeypatch.setenv("LMTK_RUNS", str(clm_run.parent))
    res = helpers.cli("eval", "clm", "suite=[mqar,passkey,speed]", "device=cpu",
                      "mqar.seq_lens=[16]", "mqar.kv_pairs=[2]", "mqar.vocab_size=16", "mqar.steps=3", "mqar.test_sequences=8",
                      "passkey.lengths=[128,4096]", "passkey.depths=[0.5]", "passkey.trials=1",
                      "speed.seq_len=32", "speed.batch_size=2", "speed.train_steps=1", "speed.prefill_repeats=1",
                      "speed.contexts=[16]", "speed.decode_tokens=2")
    assert res.exit_code == 0, res.output
    out = {s: json.loads((clm_run / "eval" / f"{s}.json").read_text()) for s in ("mqar", "passkey", "speed")}
    assert out["mqar"]["headline"] == "accuracy" and out["mqar"]["samples"] == 8
    assert out["mqar"]["rows"][0]["seq_len"] == 16 and out["mqar"]["config"]["steps"] == 3
    assert out["passkey"]["headline"] == "accuracy" and "len4096" not in out["passkey"]["scores"]
    assert any("4096 (reported, not scored)" in n for n in out["passkey"]["notes"])
    assert out["speed"]["scores"]["train_tok_s"] > 0 and out["speed"]["scores"]["decode_ms@16"] > 0
