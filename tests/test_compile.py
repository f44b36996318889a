"""train.compile=true works for every recipe: same losses as eager, to float tolerance.

Compiling costs 20-60 s per recipe on a CPU, so the per-recipe runs are marked slow
(`make test-all`); bench/compile.py times them. The default run keeps one compiled training
step of a one-block d=32 model against eager (~20 s cold on 2 cores, ~3 s with inductor's
on-disk cache warm), so a compile that changes the numbers fails `make test` too."""

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


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    import torch

    from lmtk.models import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, positions="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    eager, compiled = build_model(cfg), build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (eager, compiled):
        m.train()
        loss = m.head_loss(m.hidden(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert compiled.blocks[0]._compiled_call_impl is not None  # really compiled (nn.Module.compile)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_training_matches_eager(recipe, lmtk_env):
    helpers.train(recipe, *SMALL, "run.name=eager")
    helpers.train(recipe, *SMALL, "train.compile=true", "run.name=compiled")
    eager = [m["loss"] for m in helpers.metrics(lmtk_env.runs / "eager") if "loss" in m]
    compiled = [m["loss"] for m in helpers.metrics(lmtk_env.runs / "compiled") if "loss" in m]
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, abs=1e-4)
