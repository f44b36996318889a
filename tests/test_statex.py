"""State expansion after training (StateX; lmtk/finetune/expand.py, the mixers' widen_state_from):
the widened model's logits are the base's at step 0 for gla and mamba2 (conv or not, bias or not,
grouped B/C), its state is factor times larger, and the new state dimensions are trainable (a
gradient reaches the new queries / C rows, which start at zero); `lmtk finetune
model.mixer.state_expand=2` runs end to end on a tiny recurrent run, its first validation equals
the unexpanded model's and its checkpoint reloads as the widened model; other bases are refused."""

from __future__ import annotations

import pytest
import torch

import helpers
from lmtk.errors import UserError
from lmtk.finetune.expand import check, expand_state, state_size
from lmtk.models import ModelConfig, build_model

CASES = [
    ({"name": "gla", "conv": 4}, True),
    ({"name": "gla", "conv": 0}, False),
    ({"name": "mamba2", "d_state": 8, "conv": 4}, True),
    ({"name": "mamba2", "d_state": 8, "conv": 0, "groups": 2}, False),
]


def trained_like(mixer: dict, bias: bool, layers=None):
    """A tiny model with every weight moved off its initialisation (as training would)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, positions="none", bias=bias,
                      mixer={**mixer, "chunk": 8} if mixer["name"] != "attention" else mixer, layers=layers)
    lm = build_model(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lm.eval()


@pytest.mark.parametrize("mixer,bias", CASES, ids=lambda c: str(c))
def test_widened_model_computes_the_base_function_and_the_new_state_trains(mixer, bias):
    lm = trained_like(mixer, bias)
    x = torch.randint(0, 61, (2, 21))  # T not a multiple of the chunk
    big = expand_state(lm, 2)
    assert state_size(big) == 2 * state_size(lm)
    assert big.cfg.mixer["state_expand"] == 2 and lm.cfg.mixer["state_expand"] == 1
    with torch.no_grad():
        a, b = lm.logits(lm.hidden(x)), big.logits(big.hidden(x))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # the new directions start at zero but get a gradient (not stuck at a saddle)
    big.train()
    big.logits(big.hidden(x)).logsumexp(-1).mean().backward()
    m = big.blocks[0].mixer
    if mixer["name"] == "gla":
        new = m.q.weight.grad.unflatten(0, (m.n_heads, m.dk))[:, m.dk // 2:]
        assert (m.q.weight.unflatten(0, (m.n_heads, m.dk))[:, m.dk // 2:] == 0).all()
    else:
        G, n = m.groups, m.d_state
        C = m.in_proj.weight.grad[m.z_width + m.d_inner + G * n:][:G * n].unflatten(0, (G, n))
        new = C[:, n // 2:]
    assert new.abs().sum() > 0
    # twice: the factor multiplies the one already there (relative to the base's)
    assert expand_state(big, 2).cfg.mixer["state_expand"] == 4


def test_hybrid_widens_its_recurrent_layers_only():
    lm = trained_like({"name": "gla"}, True, layers="RA")
    big = expand_state(lm, 3)
    x = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(big.logits(big.hidden(x)), lm.logits(lm.hidden(x)), rtol=0, atol=1e-5)
    assert big.blocks[0].mixer.dk == 3 * lm.blocks[0].mixer.dk
    assert torch.equal(big.blocks[1].mixer.qkv.weight, lm.blocks[1].mixer.qkv.weight)


def test_refusals():
    with pytest.raises(UserError, match="mixer retnet has no state expansion; it is implemented for gla, mamba2"):
        check(trained_like({"name": "retnet"}, True), 2, "full")
    with pytest.raises(UserError, match="the base is softmax attention, whose state"):
        check(trained_like({"name": "attention"}, True), 2, "full")
    with pytest.raises(UserError, match="needs peft=full"):
        check(trained_like({"name": "gla"}, True), 2, "lora")
    from lmtk.config import compose

    # lmtk train: the mixer's own Config decides; lmtk finetune: the base's mixer (above)
    with pytest.raises(UserError, match="unknown config key 'model.mixer.state_expand'"):
        compose("default", ["model.mixer.state_expand=2"])
    assert compose("finetune", ["base=x", "model.mixer.state_expand=2"]).model.mixer.state_expand == 2
    with pytest.raises(UserError, match="state_expand=0 for mixer gla: the state-size factor must be a whole number >= 1"):
        compose("default", ["model/mixer=gla", "model.mixer.state_expand=0"])


def test_finetune_state_expand_end_to_end(lmtk_env):
    """A tiny gla run widened x2 and trained 3 steps on text: its validation at step 0 is the
    base's final one (the same validation tokens), then training moves it; the run's model config
    says state_expand 2 and its checkpoint loads as that model."""
    from lmtk.checkpoint import load_pretrained

    helpers.train(*helpers.TINY, "model/mixer=gla", "budget.steps=3", "run.name=rec")
    base = lmtk_env.runs / "rec"
    helpers.ok("finetune", f"base={base}", "peft=full", "budget.epochs=null", "budget.steps=3", "val.at_start=true", "val.every=3",
               *helpers.DATA, "data.seq_len=32", "val.tokens=2048", "train.batch_size=8", "train.micro_batch_size=8",
               "train.lr=1e-3", "model.mixer.state_expand=2", "run.name=wide")
    before = [m["val/loss"] for m in helpers.metrics(base) if "val/loss" in m]
    wide = [m["val/loss"] for m in helpers.metrics(lmtk_env.runs / "wide") if "val/loss" in m]
    assert len(wide) == 2 and wide[0] == pytest.approx(before[-1], abs=1e-5) and wide[1] != wide[0]
    model, _, _ = load_pretrained(lmtk_env.runs / "wide")
    assert model.cfg.mixer["state_expand"] == 2 and model.blocks[0].mixer.dk == 2 * (32 // 2 // 2)
    info = helpers.info(lmtk_env.runs / "wide")
    assert info["status"] == "done" and info["summary"]["trainable_fraction"] == 1.0
