"""train.compile=true works for every recipe: same losses as eager, to float tolerance.

Compiling costs 20-60 s per recipe on a CPU, so the per-recipe runs are marked slow
(`make test-all`); bench/compile.py times them."""

from __future__ import annotations

import pytest

import helpers

RECIPES = ["default", "cramming-gpt", "cramming-bert", "antlm", "gpt-bert"]
SMALL = [*helpers.TINY, "budget.steps=3", "logger.every=1", "device=cpu"]


def test_compile_flag_compiles_the_blocks(monkeypatch):
    from lmtk.models.transformer import LanguageModel

    calls = []
    monkeypatch.setattr(LanguageModel, "compile_blocks", lambda self: calls.append(len(self.blocks)))
    helpers.train("default", *SMALL, "train.compile=true", "run.name=flag")
    assert calls == [2]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_training_matches_eager(recipe, lmtk_env):
    helpers.train(recipe, *SMALL, "run.name=eager")
    helpers.train(recipe, *SMALL, "train.compile=true", "run.name=compiled")
    eager = [m["loss"] for m in helpers.metrics(lmtk_env.runs / "eager") if "loss" in m]
    compiled = [m["loss"] for m in helpers.metrics(lmtk_env.runs / "compiled") if "loss" in m]
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, abs=1e-4)
