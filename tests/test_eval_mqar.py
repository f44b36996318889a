"""suite=mqar: the MQAR generator's invariants, the grid and its errors, and a tiny attention
model learning the task through the one training loop on a CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmtk.data.synthetic import IGNORE, MQARData, mqar, mqar_fits, query_gap_weights
from lmtk.errors import UserError
from lmtk.eval import mqar as suite
from lmtk.models import ModelConfig

N, L, KV, V = 64, 64, 8, 128


@pytest.fixture(scope="module")
def data():
    return mqar(N, L, KV, V, seed=3)


def test_shapes_and_targets_only_on_query_positions(data):
    x, t = data
    assert x.shape == t.shape == (N, L) and x.dtype == t.dtype == torch.long
    scored = t != IGNORE
    assert (scored.sum(1) == KV).all()  # one target per key, nowhere else
    assert not scored[:, : 2 * KV].any()  # never in the key-value pairs
    assert (x[scored] < V // 2).all() and (x[scored] >= 1).all()  # a query is a key


def test_keys_and_values_are_disjoint_ranges_without_repeats(data):
    x, _ = data
    keys, values = x[:, 0 : 2 * KV : 2], x[:, 1 : 2 * KV : 2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    for row in range(N):
        assert len(set(keys[row].tolist())) == KV and len(set(values[row].tolist())) == KV


def test_each_query_key_appeared_earlier_with_its_answer_right_after(data):
    x, t = data
    for b in range(N):
        for p in (t[b] != IGNORE).nonzero()[:, 0].tolist():
            key = int(x[b, p])
            earlier = (x[b, :p] == key).nonzero()[:, 0].tolist()
            assert earlier and earlier[0] % 2 == 0 and earlier[0] < 2 * KV
            assert int(x[b, earlier[0] + 1]) == int(t[b, p])  # the answer follows the key


def test_query_gaps_follow_a_power_law():
    """With a = 0.01 short gaps dominate and the frequency falls off as ~1/g; a = 1 is flat."""
    seq, kv, n = 512, 4, 2000
    x, t = mqar(n, seq, kv, 1024, seed=0)
    gaps = ((t != IGNORE).nonzero()[:, 1] - 2 * kv) // 2
    space = (seq - 2 * kv) // 2
    counts = torch.bincount(gaps, minlength=space).float()
    assert counts[:8].sum() > counts[64:].sum() / 4  # the first 8 of 252 offsets carry a large share
    assert counts[0] > 3 * counts[8:16].mean()  # ~1/g: offset 0 about 10x offsets 8..15
    w = query_gap_weights(space, 0.01)
    assert torch.isclose(w[0] / w[9], torch.tensor(10.0, dtype=w.dtype) ** 0.99)
    _, tu = mqar(n, seq, kv, 1024, seed=0, power_a=1.0)
    gu = ((tu != IGNORE).nonzero()[:, 1] - 2 * kv) // 2
    assert abs(gu.float().mean().item() - (space - 1) / 2) < 0.1 * space  # uniform


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = mqar(8, 32, 4, 64, seed=1), mqar(8, 32, 4, 64, seed=1), mqar(8, 32, 4, 64, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    stream = MQARData(32, 4, 64, seed=0)
    assert torch.equal(stream.get(16, 8), stream.get(16, 8))
    assert stream.get(16, 8).shape == (8, 2, 32)
    assert not torch.equal(stream.get(0, 8), stream.get(8, 8))


def test_random_filler_fills_with_the_whole_vocabulary():
    x, t = mqar(16, 64, 4, 64, seed=0, random_filler=True)
    filler = x[:, 8:][t[:, 8:] == IGNORE]
    assert filler.min() < 32 <= filler.max() and (filler != 0).float().mean() > 0.9


def test_fit_rule():
    assert mqar_fits(64, 16) and not mqar_fits(64, 17) and not mqar_fits(8, 0)


def test_grids_and_errors():
    cells, vocab, steps, notes = suite.cells(suite.Config())
    assert cells == [(64, 4), (64, 8), (64, 16), (128, 4), (128, 8), (128, 16)] and vocab == 64
    z, vz, _, notes = suite.cells(suite.Config(grid="zoology"))
    assert {L for L, _ in z} == {64, 128, 256, 512} and {kv for _, kv in z} == {4, 8, 16, 32, 64} and vz == 8192
    assert all(kv <= L // 4 for L, kv in z) and any("left out" in n for n in notes)
    with pytest.raises(UserError, match=r"kv_pairs=32 does not fit seq_len=64"):
        suite.Config(seq_lens=[64], kv_pairs=[32])
    with pytest.raises(UserError, match=r"mqar.vocab_size=16 is too small"):
        suite.Config(seq_lens=[64], kv_pairs=[8], vocab_size=16)
    with pytest.raises(UserError, match=r"mqar.grid=big is not one of: small, zoology"):
        suite.Config(grid="big")


def tiny_target(mixer: str = "attention", **kw) -> SimpleNamespace:
    kw = {"n_heads": 4, **kw}
    mc = ModelConfig(vocab_size=100, d_model=64, n_layers=2, positions="rope", rope_layout="half",
                     norm="rmsnorm", mlp="swiglu", bias=False, mixer={"name": mixer}, **kw)
    return SimpleNamespace(model=None, tokenizer=None, model_cfg=mc, meta={}, device=torch.device("cpu"), dtype=None,
                           name="tiny", seed=0)


def test_the_cell_model_is_the_runs_architecture_at_the_tasks_vocabulary():
    mc = suite.model_config(tiny_target("gla", max_seq_len=1024), 256, 64)
    assert (mc.vocab_size, mc.max_seq_len, mc.d_model, mc.n_layers, mc.mixer["name"]) == (256, 64, 64, 2, "gla")


# One head of 64 dims and a slow warmup: the lr ramps to 3e-3 over ~190 steps and the induction
# circuit forms soon after (loss ~0.9 at step 250, ~0.1 at 300). A 30-step ramp to the same lr
# (constant or cosine after it), or 4 heads of 16 dims, sat on the 1/kv plateau (guessing one of
# the sequence's own values) through step 300 (4 heads: past 1,500)
STEPS, LR, BATCH, WARMUP = 350, 3e-3, 64, 0.55


def test_a_tiny_attention_model_learns_recall():
    """2 layers, d 64, one head, seq 64, kv 4, through fit(): held-out accuracy far past chance
    (1/32: one of the 32 values) and past the in-context guess (1/kv = 0.25)."""
    cfg = suite.Config(seq_lens=[64], kv_pairs=[4], vocab_size=64, steps=STEPS, lr=LR, batch_size=BATCH, warmup=WARMUP,
                       test_sequences=128)
    out = suite.run(tiny_target(n_heads=1), cfg)
    row = out["rows"][0]
    assert list(out["scores"])[:2] == ["accuracy", "chance"] and out["scores"]["chance"] == 1 / 32
    assert out["samples"] == 128 and row["steps"] == STEPS and row["accuracy"] == out["scores"]["seq64_kv4"]
    assert row["accuracy"] > 0.8, out
    assert row["train_loss"] < 0.25 * math.log(32), out  # the last tenth's mean


def test_labelled_scores_only_the_query_positions():
    """The objective's loss is the cross-entropy at the query positions alone, in order."""
    from lmtk.models import build_model
    from lmtk.objectives import Labelled

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    batch = MQARData(32, 4, 64, seed=0).get(0, 4)
    obj = Labelled(4, 32)
    h, t = obj.predict(model, batch)
    assert h.shape == (4, 4, 32) and torch.equal(t, batch[:, 1][batch[:, 1] != IGNORE].reshape(4, 4))
    with torch.no_grad():
        logits = model(batch[:, 0])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1].reshape(-1), ignore_index=IGNORE)
        assert torch.isclose(obj.loss(model, batch, None)[0], ref, atol=1e-5)
