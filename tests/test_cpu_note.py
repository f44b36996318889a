"""A GPU-sized recipe started on a CPU says so in one line before any work: the expected
tokens/s here, what its budget buys, how to shrink it. Small runs say nothing."""

from __future__ import annotations

import pytest
import torch

import helpers
from lmtk.config import compose
from lmtk.train import pretrain
from lmtk.train.pretrain import cpu_budget_note

CPU = torch.device("cpu")


@pytest.mark.parametrize("recipe", ["cramming-bert", "cramming-gpt"])
def test_gpu_recipes_on_a_cpu_get_the_note(recipe):
    note = cpu_budget_note(compose(recipe, []), CPU)
    assert note is not None and "\n" not in note
    assert recipe in note and "tok/s" in note and "M tokens" in note and "model=small-gpt" in note
    assert "budget.steps=" in note


@pytest.mark.parametrize("recipe,overrides", [
    ("default", []), ("antlm", []), ("gpt-bert", []),
    ("default", ["budget.hours=24"]),  # a long run of a CPU-sized model is the user's choice
    ("cramming-bert", [*helpers.TINY_MODEL, "budget.hours=null", "budget.steps=100"]),  # shrunk: fits
])
def test_cpu_sized_runs_get_no_note(recipe, overrides):
    assert cpu_budget_note(compose(recipe, overrides), CPU) is None


def test_no_note_on_a_gpu():
    assert cpu_budget_note(compose("cramming-bert", []), torch.device("cuda")) is None


def test_the_estimate_follows_the_model_flops(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cfg = compose("cramming-gpt", ["budget.hours=1"])
    note = cpu_budget_note(cfg, CPU)
    from lmtk.models import LanguageModel, model_config, padded_vocab

    model = LanguageModel(model_config(cfg.model, padded_vocab(cfg.tokenizer.vocab_size)))
    tok_s = 2 * pretrain.CPU_GFLOPS_PER_THREAD * 1e9 / model.flops_per_token(cfg.data.seq_len)
    assert f"~{tok_s:,.0f} tok/s" in note and f"~{tok_s * 3600 / 1e6:.1f}M tokens" in note


@pytest.mark.parametrize("recipe,shown", [("cramming-bert", True), ("default", False)])
def test_train_prints_the_note_once_before_it_starts(monkeypatch, recipe, shown):
    """`lmtk train RECIPE device=cpu` (training itself stubbed: the note comes before any work)."""
    started = []
    monkeypatch.setattr(pretrain, "_run", lambda *a, **k: started.append(1) or {})
    res = helpers.cli("train", recipe, "device=cpu")
    assert res.exit_code == 0, res.output
    assert started == [1]
    assert res.output.count("is sized for a GPU") == (1 if shown else 0), res.output
