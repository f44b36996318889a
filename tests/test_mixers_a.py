"""Recurrent mixers on the shared recurrence (issue 10): linear attention (every feature map),
RetNet, GLA, HGRN2. Each: decoding token by token (after a chunked prefill) equals the full
forward; the chunk length does not change the output; causality; gradients reach every
parameter; init_weights survives the model-wide init; config composition; hybrids; one small
learning run on real text."""

from __future__ import annotations

import math

import pytest
import torch

import helpers
from lmtk.config import compose
from lmtk.errors import UserError
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.mixers import MIXERS
from lmtk.models.mixers.linear import FEATURE_MAPS
from lmtk.models.mixers.retnet import retention_decays

V = 97

# mixer knobs per case: every feature map of `linear`, and each mixer with a short conv
CASES = {
    **{f"linear-{fm}": {"name": "linear", "feature_map": fm, "feature_dim": 4} for fm in FEATURE_MAPS},
    "linear-unnormalized": {"name": "linear", "feature_map": "elu1", "normalize": False, "output_norm": True,
                            "output_gate": True},
    "linear-conv": {"name": "linear", "feature_map": "taylor", "feature_dim": 4, "conv": 4},
    "retnet": {"name": "retnet"},
    "retnet-conv": {"name": "retnet", "conv": 3, "output_gate": False},
    "gla": {"name": "gla"},
    "gla-conv": {"name": "gla", "conv": 4},
    "hgrn2": {"name": "hgrn2", "expand_ratio": 8},
    "hgrn2-conv": {"name": "hgrn2", "expand_ratio": 8, "conv": 4, "output_gate": True, "n_heads": 2},
}


def model(mixer: dict, perturb: bool = True, **kw) -> LanguageModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, positions="none", norm="rmsnorm",
               mlp="swiglu", bias=False, mixer=mixer)
    cfg.update(kw)
    m = LanguageModel(ModelConfig(**cfg)).eval()
    if perturb:
        with torch.no_grad():  # break the init's symmetries (zero biases, identity maps) so every part matters
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return m


def ids(T: int, seed: int, B: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_every_mixer_is_registered_and_causal_only():
    for name in ("linear", "retnet", "gla", "hgrn2"):
        assert MIXERS[name].causal_only


@pytest.mark.parametrize("case", CASES)
def test_decoding_equals_full_forward(case):
    """A prefill of 7 (chunked, chunk 4: two chunks) then one token at a time through the cache
    (the step form), then a second prefill of 5 continuing from the carried state."""
    m = model({**CASES[case], "chunk": 4})
    x = ids(25, 1)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        steps = [m(x[:, :7], cache=cache)]
        steps += [m(x[:, t:t + 1], cache=cache) for t in range(7, 20)]
        steps += [m(x[:, 20:], cache=cache)]
    assert cache.offset == 25
    out = torch.cat(steps, dim=1)
    assert torch.allclose(out, full, atol=1e-4), (out - full).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_chunk_length_does_not_change_the_output(case):
    x = ids(23, 2)  # divisible by neither chunk length
    with torch.no_grad():
        a = model({**CASES[case], "chunk": 8})(x)
        b = model({**CASES[case], "chunk": 5})(x)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_causal(case):
    m = model({**CASES[case], "chunk": 4})
    a = ids(18, 3, B=1)
    b = a.clone()
    b[0, 11:] = (b[0, 11:] + 1) % V
    with torch.no_grad():
        ya, yb = m(a), m(b)
    assert torch.allclose(ya[0, :11], yb[0, :11], atol=1e-6)
    assert not torch.allclose(ya[0, 11:], yb[0, 11:], atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case):
    m = model({**CASES[case], "chunk": 4}).train()
    m(ids(11, 4)).logsumexp(-1).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("case", CASES)
def test_builds_on_the_meta_device(case):
    """The trainer sizes models on the meta device (cpu_budget_note): init_weights must not read values."""
    with torch.device("meta"):
        model(CASES[case], perturb=False, n_layers=3)


def test_bidirectional_reading_is_refused():
    m = model(CASES["gla"])
    with pytest.raises(ValueError, match="causal only"):
        m(ids(5, 0), causal=False)
    assert m.causal_only


def test_init_weights_survive_the_model_wide_init():
    # GLA: the gate bias gives per-step decays from 0.9 to 0.999 at x = 0 in every head
    gla = model({"name": "gla"}, perturb=False, n_layers=3).blocks[2].mixer
    decay = (torch.nn.functional.logsigmoid(gla.gate_up.bias) / 16).exp().view(gla.n_heads, gla.dk)
    assert torch.allclose(decay[:, 0], torch.tensor(0.9), atol=1e-5) and torch.allclose(decay[:, -1], torch.tensor(0.999), atol=1e-5)
    assert (decay.diff(dim=1) > 0).all()
    # RetNet: gamma_h = 1 - 2^(-5-h)
    ret = model({"name": "retnet"}, perturb=False, n_heads=4).blocks[0].mixer
    assert torch.allclose(ret.log_decay.exp(), 1 - 2.0 ** (-5 - torch.arange(4.0)))
    assert torch.allclose(retention_decays(4), ret.log_decay)
    # HGRN2: no lower bound in the first layer, then l / L rising with depth
    blocks = model({"name": "hgrn2", "expand_ratio": 8}, perturb=False, n_layers=4).blocks
    assert blocks[0].mixer.lower_bound is None
    bounds = [torch.sigmoid(b.mixer.lower_bound) for b in blocks[1:]]
    for layer, beta in enumerate(bounds, start=1):
        assert torch.allclose(beta, torch.tensor(layer / 4)), (layer, beta)
    # Hedgehog: q's and k's maps start as the identity
    lin = model({"name": "linear", "feature_map": "hedgehog", "feature_dim": 16}, perturb=False).blocks[1].mixer
    for phi in (lin.phi_q, lin.phi_k):
        assert torch.equal(phi.weight, torch.eye(16).expand(2, 16, 16))
    assert lin.phi_q is not lin.phi_k


def test_lower_bound_keeps_forget_gates_above_it():
    """HGRN2's f = beta + (1 - beta) sigmoid(.) in (beta, 1): log f from logaddexp is exact."""
    m = model({"name": "hgrn2", "expand_ratio": 8}, perturb=False, n_layers=4).blocks[3].mixer
    z = torch.linspace(-30, 30, 7)[:, None].expand(7, m.lower_bound.numel())
    f = m.log_forget(z).exp()
    beta = torch.sigmoid(m.lower_bound)
    assert torch.allclose(f, beta + (1 - beta) * torch.sigmoid(z), atol=1e-6)
    assert (f >= beta - 1e-6).all() and (f <= 1).all()


def test_linear_normaliser_is_the_kernel_weighted_mean():
    """normalize: y_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s), written out."""
    m = model({"name": "linear", "feature_map": "elu1", "chunk": 4}, n_layers=1).blocks[0].mixer
    x = torch.randn(1, 9, 32)
    H = m.n_heads
    q = torch.nn.functional.elu(m.heads(m.q(x), H)) + 1
    k = torch.nn.functional.elu(m.heads(m.k(x), H)) + 1
    v = m.heads(m.v(x), H)
    w = (q @ k.transpose(-1, -2)).tril()
    ref = m.out(m.merge((w @ v) / (w.sum(-1, keepdim=True) + m.eps)))
    with torch.no_grad():
        assert torch.allclose(m(x)[0], ref, atol=1e-5)


def test_taylor_features_approximate_exp():
    """Based's phi: phi(q).phi(k) = 1 + s + s^2/2 with s = q.k / sqrt(f)."""
    from lmtk.models.mixers.linear import Taylor

    q, k = torch.randn(5, 16), torch.randn(5, 16)
    s = (q * k).sum(-1) / 4
    phi = Taylor(16)
    assert torch.allclose((phi(q) * phi(k)).sum(-1), 1 + s + s * s / 2, atol=1e-5)


def test_config_composes_and_checks_knobs():
    for name in ("linear", "retnet", "gla", "hgrn2"):
        cfg = compose("default", [f"model/mixer={name}", "model.mixer.chunk=16"])
        assert cfg.model.mixer["name"] == name and cfg.model.mixer["chunk"] == 16
    with pytest.raises(UserError, match="chnk"):
        compose("default", ["model/mixer=gla", "model.mixer.chnk=16"])
    with pytest.raises(UserError, match="feature_map"):
        compose("default", ["model/mixer=linear", "model.mixer.feature_map=taylr"])
    with pytest.raises(UserError, match="chunk"):
        compose("default", ["model/mixer=retnet", "model.mixer.chunk=0"])
    with pytest.raises(UserError):  # value widths that do not split into the heads
        model({"name": "gla", "n_heads": 3})


def test_flops_per_token_is_the_recurrence_count():
    m = model({"name": "gla"}).blocks[0].mixer  # H=2, Dk = 0.5 * 32 / 2 = 8, Dv = 16
    assert m.flops_per_token(64) == 12 * 2 * 8 * 16


@pytest.mark.parametrize("name", ["retnet", "gla"])
def test_hybrid_decodes_like_the_full_forward(name):
    m = model({"name": name, "chunk": 4}, layers="RA", positions="rope")
    assert isinstance(m.blocks[0].mixer, MIXERS[name]) and isinstance(m.blocks[1].mixer, MIXERS["attention"])
    x = ids(15, 5)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        out = torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, 15)], dim=1)
    assert torch.allclose(out, full, atol=1e-4), (out - full).abs().max()


def test_gla_learns_real_text(lmtk_env):
    """60 steps of tiny GLA (objective=clm) on the embedded corpus: val/clm_loss falls clearly
    below step 0's and below the unigram model (~6.94 -> ~5.53, unigram ~5.79; ~3 s)."""
    helpers.train(*helpers.TINY, "model/mixer=gla", "model.mixer.chunk=16", "budget.steps=60", "train.lr=1e-2",
                  "run.name=gla")
    run = lmtk_env.runs / "gla"
    rows = [r for r in helpers.metrics(run) if "val/clm_loss" in r]
    start, end = rows[0]["val/clm_loss"], rows[-1]["val/clm_loss"]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 60
    assert math.isfinite(end) and end < start - 1.0, (start, end)
    assert end < helpers.info(run)["summary"]["unigram_loss"], end


def test_masked_objectives_are_refused(lmtk_env):
    with pytest.raises(AssertionError, match="objective=clm"):
        helpers.train(*helpers.TINY, "model/mixer=hgrn2", "objective=mlm", "budget.steps=2", "run.name=no")
