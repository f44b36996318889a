"""lmtk.eval.scoring: padded batches score like one text at a time, the chunked head equals the
whole head, sliding windows count each token once, batched PLL equals the one-at-a-time one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmtk.eval import scoring
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.infer import causal_logprobs, masked_logits

V = 50


def tiny(mixer="attention", max_seq_len=16, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len, positions="rope",
                      rope_layout="half", norm="rmsnorm", mlp="swiglu", bias=False, mixer={"name": mixer}, **kw)
    return LanguageModel(cfg).eval()


def texts(n, lo=3, hi=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def direct(model, seq, start):
    """sum of log p(seq[t] | seq[:t]) for t >= start, from one unpadded causal pass."""
    lp = causal_logprobs(model, torch.tensor([seq]))[0]  # [T-1]: position t-1 is token t
    return float(lp[start - 1:].double().sum())


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_continuation_padded_batch_equals_one_by_one_and_causal_logprobs(mixer):
    model = tiny(mixer)
    reqs = [(t[:k], t[k:]) for t, k in zip(texts(7), [1, 2, 3, 1, 2, 4, 1])]
    batched = scoring.continuation_logprobs(model, reqs, batch_size=3)
    for (ctx, cont), (s, g) in zip(reqs, batched):
        alone, g1 = scoring.continuation_logprobs(model, [(ctx, cont)], batch_size=1)[0]
        assert s == pytest.approx(alone, abs=1e-4)
        assert g == g1
        assert s == pytest.approx(direct(model, ctx + cont, len(ctx)), abs=1e-4)


def test_greedy_flag_is_the_argmax():
    model = tiny()
    ctx = [7, 8, 9]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    other = (nxt + 1) % V
    (_, g_yes), (_, g_no) = scoring.continuation_logprobs(model, [(ctx, [nxt]), (ctx, [other])])
    assert g_yes and not g_no


def test_chunked_head_equals_one_chunk(monkeypatch):
    """The head runs CHUNK_ROWS positions at a time (never [B, T, vocab]); any chunk size gives the same numbers."""
    model = tiny()
    reqs = [(t[:1], t[1:]) for t in texts(5)]
    whole = scoring.continuation_logprobs(model, reqs)
    seen = []
    real = model.logits

    def spy(h):
        seen.append(h.shape[0])
        return real(h)

    monkeypatch.setattr(scoring, "CHUNK_ROWS", 3)
    monkeypatch.setattr(model, "logits", spy)
    small = scoring.continuation_logprobs(model, reqs)
    assert max(seen) <= 3 and len(seen) > 3
    for (a, ga), (b, gb) in zip(whole, small):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_long_context_is_cut_from_the_left():
    model = tiny(max_seq_len=8)
    ctx, cont = list(range(5, 25)), [30, 31]
    s, _ = scoring.continuation_logprobs(model, [(ctx, cont)])[0]
    kept = (ctx + cont)[-8:]
    assert s == pytest.approx(direct(model, kept, 6), abs=1e-4)
    with pytest.raises(ValueError, match="non-empty context"):
        scoring.continuation_logprobs(model, [([], [5])])


def test_rolling_short_text_is_the_direct_sum():
    model = tiny(max_seq_len=16)
    ids = texts(1, 10, 11)[0]
    total, n = scoring.rolling_logprob(model, ids)
    assert n == len(ids) - 1
    assert total == pytest.approx(direct(model, ids, 1), abs=1e-4)


@pytest.mark.parametrize("stride", [None, 1, 5, 15])
def test_rolling_long_text_scores_each_token_once(stride):
    L = 16
    model = tiny(max_seq_len=L)
    ids = texts(1, 50, 51, seed=3)[0]
    wins = scoring.rolling_windows(len(ids), L, stride or L // 2)
    scored = [t for a, m, e in wins for t in range(e, m)]
    assert scored == list(range(1, len(ids)))  # every token after the first, once, in order
    assert all(m - a <= L for a, m, _ in wins)
    total, n = scoring.rolling_logprob(model, ids, stride=stride)
    assert n == len(ids) - 1
    # the same sum, window by window, from unpadded passes
    expect = sum(direct(model, ids[a:m], e - a) for a, m, e in wins)
    assert total == pytest.approx(expect, abs=1e-4)
    if stride == 1:  # every token but the first window's sees max_len - 1 tokens of context
        assert all(e - a == L - 1 for a, m, e in wins[1:])


def slow_pll(model, seq, mask_id, shift):
    total = 0.0
    for p in range(shift, len(seq)):
        x = torch.tensor([seq])
        x[0, p] = mask_id
        total += float(F.log_softmax(masked_logits(model, x, shift)[0, p], -1)[seq[p]])
    return total


@pytest.mark.parametrize("shift", [0, 1])
def test_pll_batched_equals_slow_reference(shift):
    model = tiny()
    seqs = texts(5, 3, 9)
    got = scoring.pseudo_log_likelihoods(model, seqs, mask_id=4, shift=shift, batch_size=7)
    for seq, g in zip(seqs, got):
        assert g == pytest.approx(slow_pll(model, seq, 4, shift), abs=1e-4)
    skip = scoring.pseudo_log_likelihoods(model, seqs, mask_id=4, shift=shift, first=2)
    assert all(s > g for s, g in zip(skip, got))  # fewer (negative) terms


def test_infer_pll_defers_to_the_batched_one():
    from lmtk.models.infer import pseudo_log_likelihood

    model = tiny()
    ids = torch.tensor(texts(2, 6, 7))
    ref = scoring.pseudo_log_likelihoods(model, ids.tolist(), mask_id=4, shift=1)
    assert pseudo_log_likelihood(model, ids, 4, 1).tolist() == pytest.approx(ref, abs=1e-5)


def test_uniform_model_scores_log_vocab():
    """A model whose head gives equal logits scores every token -ln V."""
    model = tiny()
    model.logits = lambda h: torch.zeros(*h.shape[:-1], V)
    total, n = scoring.rolling_logprob(model, list(range(5, 30)))
    assert n == 24 and total == pytest.approx(-24 * math.log(V), rel=1e-6)


def test_rolling_batched_over_texts_equals_one_by_one():
    model = tiny(max_seq_len=8)
    ts = [texts(1, n, n + 1, seed=n)[0] for n in (1, 3, 8, 20)]
    got = scoring.rolling_logprobs(model, ts, stride=3, batch_size=4)
    for t, (s, n) in zip(ts, got):
        s1, n1 = scoring.rolling_logprob(model, t, stride=3)
        assert n == n1 == len(t) - 1 and s == pytest.approx(s1, abs=1e-4)


def test_autocast_dtype_scores_close_to_fp32():
    """Under bf16 autocast (a GPU's default precision) the blocks run in bf16 and the head in the
    weights' dtype: the numbers stay close to fp32's (CPU autocast here)."""
    model = tiny()
    reqs = [(t[:2], t[2:]) for t in texts(4)]
    ref = scoring.continuation_logprobs(model, reqs)
    bf = scoring.continuation_logprobs(model, reqs, dtype=torch.bfloat16)
    for (a, _), (b, _) in zip(ref, bf):
        assert b == pytest.approx(a, rel=0.05, abs=0.2)
    pll = scoring.pseudo_log_likelihoods(model, texts(2), mask_id=4, dtype=torch.bfloat16)
    assert all(math.isfinite(x) for x in pll)
    s, n = scoring.rolling_logprob(model, texts(1, 40, 41)[0], dtype=torch.bfloat16)
    assert n == 39 and math.isfinite(s)


def test_long_scoring_shows_progress_with_an_eta(monkeypatch, capsys):
    """Scoring many texts reports sequences done, their rate and an ETA (a line at a time off a
    terminal); lmtk.log.Progress is what tokenising uses too."""
    import functools

    from lmtk.log import Progress, console

    console.file = None  # rich follows sys.stderr (captured: not a terminal); conftest resets it after
    monkeypatch.setattr(scoring, "Progress", functools.partial(Progress, quiet_s=0.0, every_s=0.0))
    model = tiny()
    scoring.rolling_logprobs(model, texts(12), batch_size=4)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("scoring (causal): ")]
    assert len(lines) >= 2 and "/12.0 sequences" in lines[0] and "ETA" in lines[0] and "sequences/s" in lines[-1]
