"""suite=speed: every figure present and sane on a tiny CPU model (no timing assertions), decoding
contexts past the model's context reported, and the model under evaluation left untouched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmtk.errors import UserError
from lmtk.eval import speed as suite
from lmtk.models import LanguageModel, ModelConfig


def target(mixer: str = "attention"):
    mc = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=96, positions="rope", mixer={"name": mixer})
    torch.manual_seed(0)
    model = LanguageModel(mc).eval()
    tok = SimpleNamespace(vocab_size=128, pad_id=0, unk_id=1, cls_id=2, eos_id=3, mask_id=4, special_ids=[0, 1, 2, 3, 4])
    return SimpleNamespace(model=model, tokenizer=tok, model_cfg=mc, meta={}, device=torch.device("cpu"), dtype=None,
                           name="tiny", seed=0)


CFG = dict(seq_len=32, batch_size=2, train_steps=2, prefill_repeats=1, contexts=[8, 64, 1000], decode_tokens=4)


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_speed_reports_every_figure(mixer):
    t = target(mixer)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    out = suite.run(t, suite.Config(**CFG))
    s = out["scores"]
    assert list(s)[0] == "train_tok_s"
    for key in ("train_tok_s", "infer_tok_s", "decode_ms@8", "decode_ms@64", "peak_mem_gib", "params", "train_flops_per_token"):
        assert s[key] > 0 and s[key] < float("inf"), (key, s[key])
    assert "decode_ms@1000" not in s and "mfu" not in s  # past the context; no MFU on a CPU
    assert s["params"] == t.model.num_params() and s["train_flops_per_token"] == t.model.flops_per_token(32)
    assert s["params_non_embedding"] < s["params"]
    rows = {r["context"]: r for r in out["rows"]}
    assert rows[8]["decode_ms_per_token"] > 0 and rows[1000]["decode_ms_per_token"] is None
    assert any("1000 (reported, not measured)" in n for n in out["notes"]) and any("no MFU" in n for n in out["notes"])
    assert out["samples"] == 2 * 32 * 2
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())  # trained a copy
    assert not t.model.training


def test_bad_speed_knobs_are_errors():
    with pytest.raises(UserError, match=r"speed.seq_len=512 is past the model's context \(max_seq_len 96\)"):
        suite.run(target(), suite.Config(seq_len=512))
    with pytest.raises(UserError, match=r"speed.train_steps=0 must be at least 1"):
        suite.Config(train_steps=0)
