"""The fused, chunked linear + cross-entropy (models/fused_ce.py) against the plain head:
loss and gradients (hidden states, weight, bias; tied and untied heads) at several chunk
sizes, ignored positions, autocast, and a few optimizer steps of each objective."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmtk.models import ModelConfig, build_model
from lmtk.models.fused_ce import linear_cross_entropy
from lmtk.objectives import build_objective

V = 97  # not a multiple of anything, so no chunk or vector width lines up with it
N_SPECIAL = 5
TOK = SimpleNamespace(vocab_size=V, mask_id=4, special_ids=list(range(N_SPECIAL)))


@pytest.fixture(autouse=True)
def always_fused(monkeypatch, request):
    """These tests' shapes are far below fused_ce.PLAIN_BELOW, where the head dispatches to the
    plain path: they test the fused path itself, so the threshold is 0 here (except the dispatch tests)."""
    import lmtk.models.fused_ce as fused_ce

    if "dispatch" not in request.node.name:
        monkeypatch.setattr(fused_ce, "PLAIN_BELOW", 0)


def _case(n=37, d=12, dtype=torch.float64, bias=False, ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    if ignored:
        t[torch.randperm(n, generator=g)[:ignored]] = -100
    return h, w, b, t


def _grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1024])  # 5 and 16 do not divide 37 rows
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignored", [0, 9])
def test_loss_and_gradients_equal_the_plain_head(chunk, bias, ignored):
    h, w, b, t = _case(bias=bias, ignored=ignored)
    ref = F.cross_entropy(F.linear(h, w, b), t)  # mean over the non-ignored rows
    out = linear_cross_entropy(h, w, t, bias=b, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grads(ref, h, w, b), _grads(out, h, w, b)):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    if ignored:  # rows with an ignored target get no gradient at all
        gh = _grads(linear_cross_entropy(h, w, t, bias=b, chunk=chunk), h)[0]
        assert (gh[t == -100] == 0).all() and (gh[t != -100] != 0).any()


@pytest.mark.parametrize("n", [0, 6])  # no rows, or every row ignored
def test_nothing_to_predict_gives_nan_loss_and_zero_gradients_like_the_plain_head(n):
    h, w, b, t = _case(n=n, bias=True)
    t[:] = -100
    ref = F.cross_entropy(F.linear(h, w, b), t)
    out = linear_cross_entropy(h, w, t, bias=b, chunk=4)
    assert ref.isnan() and out.isnan()
    for a, c in zip(_grads(ref, h, w, b), _grads(out, h, w, b)):
        torch.testing.assert_close(c, a)
        assert (c == 0).all()


def test_float32_matches_to_float_tolerance_and_grad_output_scales():
    h, w, _, t = _case(n=300, d=32, dtype=torch.float32, ignored=20)
    ref = F.cross_entropy(F.linear(h, w), t)
    out = linear_cross_entropy(h, w, t, chunk=64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, c in zip(_grads(3.5 * ref, h, w), _grads(3.5 * out, h, w)):  # backward scales by grad_output
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-7)


def test_extra_leading_dims_and_only_some_inputs_needing_grad():
    h, w, _, t = _case(n=24)
    h3, t3 = h.detach().reshape(2, 12, -1), t.reshape(2, 12)  # [B, T, d] / [B, T], h frozen
    ref = F.cross_entropy(F.linear(h3, w).reshape(-1, V), t3.reshape(-1))
    out = linear_cross_entropy(h3, w, t3, chunk=7)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(_grads(out, w)[0], _grads(ref, w)[0])
    hw = h.detach().requires_grad_()
    wf = w.detach()  # frozen head (e.g. fine-tuning the body only)
    out = linear_cross_entropy(hw, wf, t, chunk=7)
    torch.testing.assert_close(_grads(out, hw)[0], _grads(F.cross_entropy(F.linear(hw, wf), t), hw)[0])


def test_without_gradients_it_is_the_plain_loss():
    h, w, b, t = _case(bias=True, ignored=3)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, t, bias=b, chunk=4)
        ref = F.cross_entropy(F.linear(h, w, b), t)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref)


def test_autocast_matches_the_plain_head_under_autocast():
    """bf16 autocast (the GPU recipe, on CPU here): matmuls in bf16, softmax in fp32, gradients in
    the parameters' dtype. Both paths round the same products to bf16, so they agree to bf16 precision."""
    h, w, _, t = _case(n=64, d=32, dtype=torch.float32, ignored=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        out = linear_cross_entropy(h, w, t, chunk=24)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, c in zip(_grads(ref, h, w), _grads(out, h, w)):
        assert c.dtype == torch.float32
        torch.testing.assert_close(c, a, rtol=5e-2, atol=2e-3)


def _model(tied=True, bias=True):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=64,
                                   tie_embeddings=tied, bias=bias))


@pytest.mark.parametrize("tied", [True, False])
def test_model_head_loss_gradients_reach_every_parameter_as_the_plain_head(tied):
    """Tied: the head's gradient lands on the shared embedding matrix, added to the embedding's own."""
    idx = torch.randint(N_SPECIAL, V, (3, 20), generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (False, True):
        m = _model(tied)
        h = m.hidden(idx)[:, :-1]
        t = idx[:, 1:].clone()
        t[0, :4] = -100
        loss = m.head_loss(h, t) if fused else F.cross_entropy(m.logits(h).reshape(-1, V), t.reshape(-1))
        loss.backward()
        assert (m.head.weight is m.embed.weight) == tied
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and ("head.weight" in g0) != tied
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["clm", "mlm", "gpt-bert", "antlm"])
def test_a_few_training_steps_match_the_unfused_path(name):
    from omegaconf import OmegaConf

    from lmtk.train.optim import build_optimizer

    def run(fused: bool) -> list[float]:
        cfg = SimpleNamespace(name=name, mask_rate=0.3, mask_token_frac=0.8, random_token_frac=0.1,
                              mask_rate_final=0.15, phases=["clm:1", "mlm:1"], causal_weight=1, masked_weight=1,
                              fused_head=fused)
        obj = build_objective(cfg, TOK)
        m = _model().train()
        opt = build_optimizer(m, OmegaConf.create({"name": "adamw", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}),
                              3e-3, torch.device("cpu"))
        losses = []
        for step in range(6):
            batch = torch.randint(N_SPECIAL, V, (4, 24), generator=torch.Generator().manual_seed(step))
            loss, _ = obj.loss(m, batch, torch.Generator().manual_seed(100 + step), step / 6)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    plain, fused = run(False), run(True)
    if name == "clm":
        assert fused[-1] < fused[0]
    assert fused == pytest.approx(plain, rel=1e-5, abs=1e-6)


@pytest.fixture(params=["cpu-path", "sync-free-path"])
def path(request, monkeypatch):
    """Both ways of getting the loss: CPU reads tensors freely (-log p[target], exact fallback,
    masking only when needed); the accelerator path avoids host syncs (row maxima, always masks)."""
    import lmtk.models.fused_ce as fc

    if request.param == "sync-free-path":
        monkeypatch.setattr(fc, "_cheap_sync", lambda device: False)
    return request.param


@pytest.mark.parametrize("ignored", [0, 9])
def test_both_loss_paths_equal_the_plain_head(path, ignored):
    h, w, b, t = _case(n=40, dtype=torch.float32, bias=True, ignored=ignored)
    ref = F.cross_entropy(F.linear(h, w, b), t)
    out = linear_cross_entropy(h, w, t, bias=b, chunk=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, c in zip(_grads(ref, h, w, b), _grads(out, h, w, b)):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-7)


def test_huge_losses_and_ignored_rows_with_vanishing_probabilities(path):
    """A row whose target probability underflows float32 (loss ~ 400 nats) keeps its exact loss,
    and an ignored row whose placeholder target underflows does not turn the sum into nan."""
    h, w, _, t = _case(n=6, d=4, dtype=torch.float32)
    w = w.detach().clone()
    h = h.detach().clone()
    h[0], h[1] = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    w[:, :2] = 0
    w[5, 0], w[6, 0] = -200, 200  # row 0: target 5 at -200, the max at +200
    w[0, 1], w[8, 1] = -300, 300  # row 1: target ignored; the placeholder (id 0) at -300
    t[0], t[1] = 5, -100
    h.requires_grad_(), w.requires_grad_()
    ref = F.cross_entropy(F.linear(h, w), t, reduction="none")
    assert ref[0] > 390 and torch.isfinite(ref).all()
    out = linear_cross_entropy(h, w, t, chunk=4)
    torch.testing.assert_close(out, ref[t != -100].mean(), rtol=1e-5, atol=1e-4)
    ref_mean = F.cross_entropy(F.linear(h, w), t)
    for a, c in zip(_grads(ref_mean, h, w), _grads(out, h, w)):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


def test_the_reused_cpu_buffer_serves_calls_of_any_shape():
    for n, d, chunk in [(50, 8, 64), (10, 8, 4), (70, 6, 32), (3, 8, 1024)]:
        h, w, _, t = _case(n=n, d=d, dtype=torch.float32, seed=n)
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=chunk), F.cross_entropy(F.linear(h, w), t))


@pytest.mark.parametrize("override,chunk", [([], 1024), (["objective.head_chunk=7"], 7)])
def test_objective_head_chunk_is_the_chunk_the_fused_head_uses(monkeypatch, override, chunk):
    """objective.head_chunk reaches linear_cross_entropy; the default is the measured 1024."""
    import lmtk.models.fused_ce as fused_ce
    from lmtk.config import compose

    seen = []
    real = fused_ce._LinearCrossEntropy.apply
    monkeypatch.setattr(fused_ce._LinearCrossEntropy, "apply", lambda *a: seen.append(a[-1]) or real(*a))
    cfg = compose("default", ["budget.steps=1", *override])
    assert cfg.objective.head_chunk == chunk
    obj = build_objective(cfg.objective, TOK)
    m = _model(True).train()
    loss, _ = obj.loss(m, torch.randint(N_SPECIAL, V, (2, 16)), torch.Generator().manual_seed(0))
    loss.backward()
    assert seen == [chunk]


def test_head_chunk_must_be_positive():
    from lmtk.config import compose
    from lmtk.errors import UserError

    with pytest.raises(UserError, match="objective.head_chunk=0"):
        compose("default", ["budget.steps=1", "objective.head_chunk=0"])


@pytest.mark.parametrize("rows,vocab,fused", [(127, 1024, False), (195, 1024, False), (196, 1024, True), (1016, 1024, True),
                                              (64, 50304, True)])
def test_head_dispatch_follows_the_measured_rule_and_both_sides_agree(monkeypatch, rows, vocab, fused):
    """Below PLAIN_BELOW rows x vocab the plain head runs, above it the fused one; loss and
    gradients are the same either way (to float rounding), so the rule only changes speed."""
    import lmtk.models.fused_ce as fused_ce

    assert fused_ce.fused_pays(rows, vocab) == fused
    calls = []
    real = fused_ce._LinearCrossEntropy.apply
    monkeypatch.setattr(fused_ce._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = (torch.randn(vocab, 16, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[:3] = -100
    out = []
    for dispatch in (True, False):  # False: always the fused path
        loss = linear_cross_entropy(h, w, t, dispatch=dispatch)
        out.append((loss.detach(), *torch.autograd.grad(loss, (h, w))))
    assert len(calls) == 1 + fused
    ref = F.cross_entropy(F.linear(h, w), t)
    torch.testing.assert_close(out[0][0], ref.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(out[0], out[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_objectives_dispatch_the_head_and_can_be_told_not_to(monkeypatch):
    """mean_loss goes through the dispatching head_loss; objective.head_dispatch=False keeps the
    fused path at any shape (bench/step.py's 'before')."""
    import lmtk.models.fused_ce as fused_ce

    seen = []
    real = fused_ce.linear_cross_entropy
    monkeypatch.setattr("lmtk.models.transformer.linear_cross_entropy", lambda *a, **k: seen.append(k["dispatch"]) or real(*a, **k))
    obj = build_objective(SimpleNamespace(name="clm", fused_head=True), TOK)
    m = _model().train()
    batch = torch.randint(N_SPECIAL, V, (2, 16))
    obj.loss(m, batch, None)[0].backward()
    obj.head_dispatch = False
    obj.loss(m, batch, None)[0].backward()
    assert seen == [True, False]
