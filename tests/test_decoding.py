"""Cached decoding: prefill + one token at a time through the KV cache gives the full forward
pass's logits, for every position kind, grouped-query and sliding-window attention; the mask
is bottom-right aligned when queries are fewer than keys; sampling's top-k/top-p."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.infer import generate, sample

V = 97


def model(**kw) -> LanguageModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, positions="rope", norm="rmsnorm",
               mlp="swiglu", bias=False)
    cfg.update(kw)
    m = LanguageModel(ModelConfig(**cfg)).eval()
    with torch.no_grad():  # break the init's symmetry of the position tables
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


CASES = {
    "rope": {}, "rope-half": {"rope_layout": "half"}, "gqa-half": {"n_kv_heads": 2, "rope_layout": "half"},
    "learned": {"positions": "learned"}, "sinusoidal": {"positions": "sinusoidal"},
    "none": {"positions": "none"}, "gqa": {"n_kv_heads": 2}, "mqa": {"n_kv_heads": 1},
    "window": {"window": 5}, "window-gqa": {"window": 3, "n_kv_heads": 2},
    "post-norm": {"norm_position": "post", "norm": "layernorm", "bias": True},
    "alibi": {"positions": "alibi"}, "alibi-gqa-window": {"positions": "alibi", "n_kv_heads": 2, "window": 5},
    "kv-shift": {"rope_layout": "half", "mixer": {"name": "attention", "kv_shift": True}},
    "kv-shift-gqa-window": {"n_kv_heads": 2, "window": 4, "mixer": {"name": "attention", "kv_shift": True}},
}


@pytest.mark.parametrize("case", CASES)
def test_token_by_token_equals_full_forward(case):
    m = model(**CASES[case])
    ids = torch.randint(0, V, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache()
        steps = [m(ids[:, :7], cache=cache)]  # prefill of 7, then one token at a time
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(7, 23)]
    assert cache.offset == 23
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4), (torch.cat(steps, 1) - full).abs().max()


@pytest.mark.parametrize("case", ["rope", "window", "gqa", "alibi", "kv-shift"])
def test_chunked_prefill_is_bottom_right_causal(case):
    """Queries fewer than keys (a second chunk after a cached first) see every earlier key:
    SDPA's is_causal would align them top-left and hide most of the cache."""
    m = model(**CASES[case])
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache()
        parts = [m(ids[:, :8], cache=cache), m(ids[:, 8:15], cache=cache), m(ids[:, 15:], cache=cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)


def test_sliding_window_sees_only_the_last_keys():
    """A window of w: the output at i does not depend on tokens before i - w + 1 (one layer)."""
    m = model(window=4, n_layers=1)
    a = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, :6] = (b[0, :6] + 1) % V  # change tokens 0..5: outputs from 9 on cannot see them
    with torch.no_grad():
        ya, yb = m(a), m(b)
    assert torch.allclose(ya[0, 9:], yb[0, 9:], atol=1e-6) and not torch.allclose(ya[0, 6:9], yb[0, 6:9])


def test_grouped_query_equals_repeated_key_value_heads():
    """GQA with 2 kv heads == full multi-head attention whose k/v heads are those 2, repeated."""
    g = model(n_kv_heads=2, n_layers=1)
    full = model(n_layers=1)
    att_g, att_f = g.blocks[0].mixer, full.blocks[0].mixer
    Dh, H = att_g.head_dim, att_g.n_heads
    with torch.no_grad():
        for name in ("embed", "blocks.0.norm1", "blocks.0.norm2", "blocks.0.mlp", "final_norm", "blocks.0.mixer.out"):
            src, dst = g.get_submodule(name), full.get_submodule(name)
            dst.load_state_dict(src.state_dict())
        wq, wk, wv = att_g.qkv.weight.split([H * Dh, 2 * Dh, 2 * Dh])
        rep = lambda w: w.view(2, Dh, -1).repeat_interleave(H // 2, dim=0).reshape(H * Dh, -1)  # noqa: E731
        att_f.qkv.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(g(ids), full(ids), atol=1e-5)
    assert g.num_params() < full.num_params()


def test_generate_with_the_cache_equals_greedy_full_forwards():
    m = model()
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(5))
    out = generate(m, ids, 30, temperature=0, max_len=20)  # past max_len: the window slides
    ref = ids
    with torch.no_grad():
        for _ in range(30):
            ref = torch.cat([ref, m(ref[:, -20:])[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ref)


def test_top_p_and_top_k_keep_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, None, 0.7, gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    draws = {int(sample(logits, 1.0, 3, None, gen)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert int(sample(logits, 0.0)) == 0


def test_flops_per_token_come_from_the_mixers():
    base, window = model(), model(window=8)
    assert base.flops_per_token(64) - window.flops_per_token(64) == 2 * 12 * 32 * (64 - 8)


def test_learned_positions_past_the_table_are_a_clear_error():
    m = model(positions="learned", max_seq_len=8)
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceed max_seq_len=8"):
            m(torch.zeros(1, 1, dtype=torch.long), cache=cache)


class _LeftToRight(torch.nn.Module):
    """A stand-in for a recurrent mixer: causal only (a cumulative mean of a projection)."""

    causal_only = True

    @dataclasses.dataclass
    class Config:
        kv_shift: bool = False  # it stands in for attention, whose conf/model/mixer/attention.yaml sets this

    def __init__(self, cfg, layer):
        super().__init__()
        self.proj = torch.nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, causal=True, state=None, offset=0, decode=False):
        h = self.proj(x)
        prev_sum, prev_n = state if state is not None else (torch.zeros_like(h[:, :1]), offset)
        csum = prev_sum + h.cumsum(1)
        n = prev_n + torch.arange(1, h.shape[1] + 1, device=h.device)[None, :, None]
        return csum / n, ((csum[:, -1:], prev_n + h.shape[1]) if decode else None)

    def flops_per_token(self, seq_len):
        return 0.0


@pytest.fixture
def left_to_right(monkeypatch):
    from lmtk.models import mixers

    monkeypatch.setitem(mixers.MIXERS, "attention", _LeftToRight)


def test_causal_only_mixer_validates_the_causal_reading_only(left_to_right, lmtk_env):
    import helpers

    res = helpers.train(*helpers.TINY, "budget.steps=2", "run.name=ltr")
    rows = helpers.metrics(lmtk_env.runs / "ltr")
    assert any("val/clm_loss" in r for r in rows) and not any("val/mlm_loss" in r for r in rows)
    assert "causal reading only" in res.output


def test_masked_objective_with_a_causal_only_mixer_is_refused(left_to_right, lmtk_env):
    import helpers

    from lmtk.errors import UserError

    res = helpers.cli("train", *helpers.TINY, "budget.steps=2", "objective=mlm", "run.name=m")
    assert isinstance(res.exception, UserError) and "cannot give (it reads left to right)" in str(res.exception)
    assert not (lmtk_env.runs / "m").exists()


def test_rope_layout_conversion_with_grouped_query_heads():
    """convert_rope_layout permutes the q rows of n_heads heads and the k rows of n_kv_heads heads."""
    from lmtk.models.layers import convert_rope_layout

    old = model(n_kv_heads=2, rope_layout="interleaved")
    new = model(n_kv_heads=2, rope_layout="half")
    new.load_state_dict(convert_rope_layout(old.state_dict(), old.cfg, to="half"))
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(old(ids), new(ids), atol=1e-5)
