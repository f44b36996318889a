"""Positions and KV shifting (issue 15, items 1-2): ALiBi's slopes and bias by hand, its
attention = softmax(scores + bias), runs past the training length where the scheme allows;
KV shifting at its identity setting = plain attention, its mix causal and padding-safe, hybrids
with attention layers; `lmtk eval suite=length` on a tiny trained run (cached decoding for both:
tests/test_decoding.py's CASES)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import helpers
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.layers import alibi_bias, alibi_slopes

V = 61


def model(**kw) -> LanguageModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, positions="alibi", norm="rmsnorm",
               mlp="swiglu", bias=False, rope_layout="half")
    cfg.update(kw)
    return LanguageModel(ModelConfig(**cfg)).eval()


def shifted(**kw) -> LanguageModel:
    return model(**{"positions": "rope", "mixer": {"name": "attention", "kv_shift": True}, **kw})


# ---- ALiBi -----------------------------------------------------------------------------------


def test_alibi_slopes_are_the_papers_geometric_sequences():
    assert alibi_slopes(8).tolist() == [2.0 ** -h for h in range(1, 9)]  # 1/2 ... 1/256
    assert alibi_slopes(4).tolist() == [2.0 ** (-2 * h) for h in range(1, 5)]  # 2^(-8h/4)
    # 6 heads: the 4 of 4 heads, then every other of 8 heads' (the odd powers 2^-1, 2^-3)
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


def test_alibi_bias_by_hand():
    m = alibi_slopes(2)  # 1/16, 1/256
    assert m.tolist() == [1 / 16, 1 / 256]
    b = alibi_bias(m, 3, 3)
    dist = torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])
    assert torch.equal(b[0], -dist / 16) and torch.equal(b[1], -dist / 256)
    # one query after a cache of 2 keys (decoding): it is key position 2, at distances 2, 1, 0
    assert torch.equal(alibi_bias(m, 1, 3)[:, 0], torch.tensor([[-2 / 16, -1 / 16, 0.0], [-2 / 256, -1 / 256, 0.0]]))


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_attention_is_the_softmax_of_scores_plus_bias(causal):
    """One attention layer against the formula written out: softmax(q k / sqrt(d) - m_h |i - j|
    [+ causal mask]) v, then the out projection; bidirectional uses the symmetric bias."""
    att = model(n_kv_heads=2).blocks[0].mixer
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    H, Hkv, Dh = 4, 2, 8
    with torch.no_grad():
        q, k, v = att.qkv(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q = q.view(2, 7, H, Dh).transpose(1, 2)
        k, v = (t.view(2, 7, Hkv, Dh).transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
        i = torch.arange(7)
        dist = (i[:, None] - i[None, :]).abs().float()
        slopes = torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
        s = q @ k.transpose(-1, -2) / math.sqrt(Dh) - slopes[:, None, None] * dist
        if causal:
            s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        ref = att.out((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
        got = att(x, causal=causal)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_alibi_causal_model_trains():
    m = model().train()
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = m.head_loss(m.hidden(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("positions", ["alibi", "rope", "none", "sinusoidal"])
def test_runs_past_the_training_length_where_the_scheme_allows(positions):
    m = model(positions=positions)  # max_seq_len 16
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = m(ids)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, :16], m(ids[:, :16]), atol=1e-5, rtol=1e-5)  # causal: the prefix is the prefix


def test_learned_positions_past_the_table_say_why():
    m = model(positions="learned")
    with pytest.raises(ValueError, match=r"positions 0..39 exceed max_seq_len=16 \(a table of that many rows\)"):
        m(torch.zeros(1, 40, dtype=torch.long))


def _padded(texts, left: bool):
    T = max(map(len, texts))
    ids, mask = torch.zeros(len(texts), T, dtype=torch.long), torch.zeros(len(texts), T, dtype=torch.bool)
    for i, t in enumerate(texts):
        sl = slice(T - len(t), T) if left else slice(0, len(t))
        ids[i, sl], mask[i, sl] = torch.tensor(t), True
    return ids, mask


@pytest.mark.parametrize("which", ["alibi", "kv_shift"])
@pytest.mark.parametrize("causal", [True, False])
def test_padded_batches_equal_one_by_one(which, causal):
    """Right padding (positions from 0 for every text): each real token's output is the text's
    alone, both readings. KV shifting: a pad is no token's predecessor (left padding, bidirectional:
    the only reading where left pads leave the positions of an unpositioned model unchanged)."""
    m = model() if which == "alibi" else shifted(positions="none")
    texts = [[5, 9, 3, 7, 1, 8, 2], [4, 4, 2], [7, 1, 3, 3, 9]]
    sides = [False] if which == "alibi" or causal else [False, True]
    with torch.no_grad():
        for left in sides:
            ids, mask = _padded(texts, left)
            batch = m(ids, causal=causal, attention_mask=mask)
            for i, t in enumerate(texts):
                real = batch[i][mask[i]]
                torch.testing.assert_close(real, m(torch.tensor([t]), causal=causal)[0], atol=1e-5, rtol=1e-5)


# ---- KV shifting -----------------------------------------------------------------------------


def test_kv_shift_init_is_the_papers_and_at_identity_equals_plain_attention():
    s, plain = shifted(n_kv_heads=2), model(positions="rope", n_kv_heads=2)
    w = s.blocks[0].mixer.kv_shift  # [k | v, current | previous, kv head]
    assert w.shape == (2, 2, 2) and ((w[:, 0] >= 0) & (w[:, 0] <= 1)).all()
    torch.testing.assert_close(w[:, 0] + w[:, 1], torch.ones(2, 2))  # a1 + a2 = b1 + b2 = 1
    missing = plain.load_state_dict(s.state_dict(), strict=False)
    assert missing.unexpected_keys == ["blocks.0.mixer.kv_shift", "blocks.1.mixer.kv_shift"] and not missing.missing_keys
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(s(ids), plain(ids), atol=1e-3)  # the initial mix is not the identity
        for b in s.blocks:
            b.mixer.kv_shift[:, 0], b.mixer.kv_shift[:, 1] = 1.0, 0.0
        for causal in (True, False):
            torch.testing.assert_close(s(ids, causal=causal), plain(ids, causal=causal), atol=1e-6, rtol=1e-6)


def test_kv_shift_mixes_the_previous_token_only():
    """Output at i depends on tokens <= i (causal), and with keys and values taken wholly from the
    previous token (a1 = b1 = 0), one layer without positions at position 0 sees only zeros."""
    m = shifted(positions="none", n_layers=1)
    a = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(5))
    b = a.clone()
    b[0, 6] = (b[0, 6] + 1) % V
    with torch.no_grad():
        ya, yb = m(a), m(b)
        assert torch.allclose(ya[0, :6], yb[0, :6], atol=1e-6) and not torch.allclose(ya[0, 6:], yb[0, 6:])
        att = m.blocks[0].mixer
        att.kv_shift[:, 0], att.kv_shift[:, 1] = 0.0, 1.0
        y0 = att(torch.randn(1, 1, 32))[0]  # k_0' = v_0' = 0: the output is the out projection of 0
        torch.testing.assert_close(y0, torch.zeros_like(y0))


@pytest.mark.parametrize("layers", [["attention", "gla"], "AR"])
def test_hybrids_with_attention_layers_build_and_decode(layers):
    """model.mixer's knobs belong to its named mixer: attention's kv_shift reaches the attention
    layers of a list whose model.mixer is attention, and a gla layer there is built with gla's
    defaults; a pattern's attention layers (model.mixer gla) get attention's defaults."""
    mixer = {"name": "attention", "kv_shift": True} if isinstance(layers, list) else {"name": "gla"}
    m = model(positions="rope", layers=layers, mixer=mixer)
    assert (m.blocks[0].mixer.kv_shift is not None) == isinstance(layers, list)
    ids = torch.randint(0, V, (1, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, cache = m(ids), m.new_cache()
        steps = [m(ids[:, :5], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


# ---- lmtk eval suite=length ------------------------------------------------------------------


def test_length_suite_on_a_tiny_trained_run(lmtk_env):
    """A row per multiple of the training context (32): learned positions with a 2x table score
    1x and 2x (past the context) and give 4x and 8x rows that say why, not a crash."""
    helpers.train(*helpers.TINY, "budget.steps=2", "run.name=lr", "model.positions=learned", "model.max_seq_len=64")
    res = helpers.ok("eval", "lr", "suite=length", "length.windows=2", "device=cpu")
    assert "length: lr" in res.output and "skipped" in res.output
    r = json.loads((lmtk_env.runs / "lr" / "eval" / "length.json").read_text())
    assert [(row["multiple"], row["length"], row["positions"]) for row in r["rows"]] == [
        ("1x", 32, "16-31"), ("2x", 64, "32-63"), ("4x", 128, "64-127"), ("8x", 256, "128-255")]
    assert r["headline"] == "loss_2x" and list(r["scores"]) == ["loss_2x", "loss_1x"]
    assert [row["note"] for row in r["rows"]] == ["", "extrapolated", "skipped", "skipped"]
    assert all(math.isfinite(row["loss"]) and row["windows"] == 2 for row in r["rows"][:2])
    assert r["rows"][0]["vs 1x"] == 0.0 and r["rows"][2]["loss"] is None and r["samples"] == 2 * (32 + 64)
    assert any("learned positions have no embedding past max_seq_len=64 (positions 64..127 would need one)" in n
               for n in r["notes"])


def test_length_windows_are_distinct_slots_spread_over_the_split():
    from lmtk.eval.length import window_starts

    for slots in (1, 2, 4, 8, 15, 16, 40):
        starts = window_starts(slots * 100 + 1, 100, 16)
        assert len(set(starts)) == len(starts) == min(16, slots) and starts[0] == 0
        assert all(s % 100 == 0 and s + 100 <= slots * 100 for s in starts)  # whole windows inside the split
    assert window_starts(4001, 100, 16)[:3] == [0, 200, 500]  # 40 slots: every 2.5th
    assert window_starts(50, 100, 16) == [0]  # shorter than one window: the one there is


@pytest.mark.parametrize("objective", ["mlm", "rts"])
def test_length_refuses_encoder_runs(objective):
    from types import SimpleNamespace

    from lmtk.errors import UserError
    from lmtk.eval.length import check_causal

    with pytest.raises(UserError, match=f"trained with objective={objective} \\(an encoder: no causal reading\\)"):
        check_causal(SimpleNamespace(objective=objective, name="r"))
    check_causal(SimpleNamespace(objective="gpt-bert", name="r"))


def test_length_config_errors():
    from lmtk.config import compose_eval
    from lmtk.errors import UserError

    assert compose_eval(["suite=length", "length.multiples=[4,1,2]"]).configs["length"].multiples == [1, 2, 4]
    with pytest.raises(UserError, match=r"length.multiples=\[0, 2\]: give whole multiples of the training context"):
        compose_eval(["suite=length", "length.multiples=[0,2]"])
    with pytest.raises(UserError, match=r"length.windows=0 must be at least 1"):
        compose_eval(["suite=length", "length.windows=0"])


def test_distill_keeps_an_attention_layer_only_with_the_same_knobs():
    """A kv_shift teacher's attention layers are not a hybrid student's (built without the shift):
    not copied whole as 'kept' (mixers.layer_knobs decides, per layer)."""
    from lmtk.distill.transfer import kept_layers

    teacher = shifted()
    plain = model(positions="rope")
    hybrid = model(positions="rope", layers="RA", mixer={"name": "gla"})
    assert kept_layers(hybrid, teacher) == [] and kept_layers(hybrid, plain) == [1]
    assert kept_layers(shifted(), teacher) == [0, 1]
