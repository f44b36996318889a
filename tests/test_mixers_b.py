"""The recurrent mixers metala, mamba2, mlstm and gdn (issue 10): cached decoding (token by token
and chunked prefill) equals the full forward, the chunk size does not change the output, causality,
gradients reach every parameter, their own initialisation survives the model-wide init, the mLSTM
cell equals a per-step mLSTM written from the paper's equations (with the stabiliser m_t), config
composition, an RA hybrid, and one short learning run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import helpers
from lmtk.config import compose
from lmtk.errors import UserError
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.mixers import MIXERS
from lmtk.models.mixers.mlstm import mlstm_cell

V = 61
# Small knobs: chunk 4 so a 23-token forward spans several chunks (and a partial one).
KNOBS = {
    "metala": {"chunk": 4},
    "mamba2": {"chunk": 4, "d_state": 8},
    "mamba2-groups": {"chunk": 4, "d_state": 8, "groups": 2},  # B, C per head group (distillation's attention shape)
    "mlstm": {"chunk": 4},
    "mlstm-exp": {"chunk": 4, "forget_gate": "exp"},
    "gdn": {"chunk": 4},
}
NAMES = list(KNOBS)


def model(case: str, layers=None, **knobs) -> LanguageModel:
    torch.manual_seed(0)
    mixer = {"name": case.split("-")[0], **KNOBS[case], **knobs}
    m = LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mixer=mixer, layers=layers,
                                  positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)).eval()
    with torch.no_grad():  # move off the init (zero gate weights, mu = 0) so every path matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def ids(T: int, seed: int = 1, B: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_registered_with_a_config_file():
    for name in ("metala", "mamba2", "mlstm", "gdn"):
        assert MIXERS[name].causal_only
        assert (helpers.REPO / "conf" / "model" / "mixer" / f"{name}.yaml").exists()


@pytest.mark.parametrize("case", NAMES)
def test_decoding_equals_full_forward(case):
    """A chunked prefill of 10 (3 chunks), a second of 5 with the carried state, then one token at a time."""
    m = model(case)
    x = ids(23)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        parts = [m(x[:, :10], cache=cache), m(x[:, 10:15], cache=cache)]
        parts += [m(x[:, t:t + 1], cache=cache) for t in range(15, 23)]
    assert cache.offset == 23
    got = torch.cat(parts, dim=1)
    assert torch.allclose(got, full, atol=1e-4), (got - full).abs().max()


@pytest.mark.parametrize("case", NAMES)
def test_chunk_size_does_not_change_the_output(case):
    a, b = model(case, chunk=4), model(case, chunk=16)
    b.load_state_dict(a.state_dict())
    x = ids(27)  # divisible by neither
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-4), (ya - yb).abs().max()


@pytest.mark.parametrize("case", NAMES)
def test_causal(case):
    m = model(case)
    a = ids(20, B=1)
    b = a.clone()
    b[0, 12] = (b[0, 12] + 1) % V
    with torch.no_grad():
        ya, yb = m(a), m(b)
    assert torch.allclose(ya[0, :12], yb[0, :12], atol=1e-6)
    assert not torch.allclose(ya[0, 12:], yb[0, 12:], atol=1e-4)
    with pytest.raises(ValueError, match="causal only"):
        m(a, causal=False)


@pytest.mark.parametrize("case", NAMES)
def test_gradients_reach_every_parameter(case):
    torch.manual_seed(0)
    mixer = {"name": case.split("-")[0], **KNOBS[case]}
    m = LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mixer=mixer)).train()
    x = ids(19)
    F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.flops_per_token(64) > 6 * m.num_params(embeddings=False)


@pytest.mark.parametrize("name", ["mamba2", "gdn"])
def test_decay_spectra_survive_the_model_init(name):
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=8, mixer={"name": name}))
    for block in m.blocks:
        mixer = block.mixer
        A = mixer.decay.A_log.exp()
        dt = F.softplus(mixer.decay.dt_bias)
        assert ((A >= 1) & (A <= 16)).all() and A.max() - A.min() > 1  # a spread, not a constant
        assert ((dt >= 1e-3 * 0.99) & (dt <= 1e-1 * 1.01)).all() and dt.max() / dt.min() > 2
        if name == "mamba2":
            assert (mixer.D == 1).all()
            assert mixer.in_proj.weight.std() < 0.03  # the model-wide init still ran on the linears


@pytest.mark.parametrize("gate", ["sigmoid", "exp"])
def test_mlstm_gate_init_survives_the_model_init(gate):
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                  mixer={"name": "mlstm", "forget_gate": gate}))
    for block in m.blocks:
        gates = block.mixer.gates
        assert (gates.weight == 0).all()
        f = gates.bias[4:]
        f = torch.sigmoid(f) if gate == "sigmoid" else f.exp()
        assert torch.allclose(f, torch.sigmoid(torch.linspace(3, 6, 4)), atol=1e-6)


def mlstm_paper(q, k, v, logi, logf, eps=1e-6, C=None, n=None, m=None):
    """The stabilised mLSTM written step by step from the paper (xLSTM, eqs. 19-27 with the
    stabiliser of eqs. 15-17): C_t = f' C_{t-1} + i' v_t k_t^T, n_t = f' n_{t-1} + i' k_t,
    h_t = C_t q_t / max(|n_t^T q_t|, exp(-m_t)), k scaled by 1/sqrt(d)."""
    B, H, T, D = q.shape
    C = torch.zeros(B, H, v.shape[-1], D, dtype=q.dtype) if C is None else C
    n = torch.zeros(B, H, D, dtype=q.dtype) if n is None else n
    m = torch.zeros(B, H, dtype=q.dtype) if m is None else m
    hs = []
    for t in range(T):
        kt = k[:, :, t] / math.sqrt(D)
        m_new = torch.maximum(logf[:, :, t] + m, logi[:, :, t])
        i = torch.exp(logi[:, :, t] - m_new)
        f = torch.exp(logf[:, :, t] + m - m_new)
        C = f[..., None, None] * C + i[..., None, None] * (v[:, :, t, :, None] @ kt[:, :, None, :])
        n = f[..., None] * n + i[..., None] * kt
        m = m_new
        num = (C @ q[:, :, t, :, None]).squeeze(-1)
        den = torch.maximum((n * q[:, :, t]).sum(-1).abs(), torch.exp(-m))
        hs.append(num / (den[..., None] + eps))
    return torch.stack(hs, dim=2), C, n, m


@pytest.mark.parametrize("gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlstm_cell_equals_the_per_step_paper_equations(gate, dtype):
    """Input-gate pre-activations up to ~60 (exp overflows fp32 beyond 88: only the stabilised
    form works), chunked with two chunk sizes, the step form, and a state carried across a split."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 19, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    logi = 20 * torch.randn(B, H, T, generator=g, dtype=dtype) + 20
    fpre = 2 * torch.randn(B, H, T, generator=g, dtype=dtype) + 2
    logf = F.logsigmoid(fpre) if gate == "sigmoid" else 0.5 * torch.randn(B, H, T, generator=g, dtype=dtype)
    ref, C, n, m = mlstm_paper(q, k, v, logi, logf)
    assert torch.isfinite(ref).all()
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for chunk in (4, 16, 64):
        h, (S, m_end) = mlstm_cell(q, k, v, logi, logf, chunk=chunk)
        assert torch.allclose(h, ref, **tol), (chunk, (h - ref).abs().max())
        assert torch.allclose(m_end, m, **tol)
        # the op's state is [C'^T, n']: the paper's stabilised states
        assert torch.allclose(S[..., :-1], C.transpose(-1, -2), **tol) and torch.allclose(S[..., -1], n, **tol)
    h, _ = mlstm_cell(q, k, v, logi, logf, decode=True, chunk=1)  # chunked with chunk 1 ...
    hs = []
    state = None
    for t in range(T):  # ... and the step form, one token at a time
        ht, state = mlstm_cell(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], logi[:, :, t:t + 1],
                               logf[:, :, t:t + 1], decode=True, state=state)
        hs.append(ht)
    assert torch.allclose(torch.cat(hs, dim=2), ref, **tol) and torch.allclose(h, ref, **tol)
    s = 7  # a chunked prefill, then the rest with the carried (state, m)
    h1, st = mlstm_cell(q[:, :, :s], k[:, :, :s], v[:, :, :s], logi[:, :, :s], logf[:, :, :s], chunk=4)
    h2, _ = mlstm_cell(q[:, :, s:], k[:, :, s:], v[:, :, s:], logi[:, :, s:], logf[:, :, s:], chunk=4, state=st)
    assert torch.allclose(torch.cat([h1, h2], dim=2), ref, **tol)


def test_config_composes_and_checks_mixer_keys():
    cfg = compose("default", ["model/mixer=mamba2", "model.mixer.chunk=16"])
    assert cfg.model.mixer.name == "mamba2" and cfg.model.mixer.chunk == 16 and cfg.model.mixer.expand == 2
    for name in ("metala", "mlstm", "gdn"):
        assert compose("default", [f"model/mixer={name}"]).model.mixer.name == name
    with pytest.raises(UserError, match="chunks"):
        compose("default", ["model/mixer=mamba2", "model.mixer.chunks=16"])
    with pytest.raises(UserError, match="forget_gate"):
        LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2,
                                  mixer={"name": "mlstm", "forget_gate": "tanh"}))


def test_hybrid_ra_with_mamba2_decodes_like_the_full_forward():
    m = model("mamba2", layers="RA")
    assert [type(b.mixer).__name__ for b in m.blocks] == ["Mamba2", "Attention"]
    x = ids(17)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        got = torch.cat([m(x[:, :9], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(9, 17)], dim=1)
    assert torch.allclose(got, full, atol=1e-4), (got - full).abs().max()


def test_gdn_learns_on_real_text(lmtk_env):
    helpers.train(*helpers.TINY, "model/mixer=gdn", "model.mixer.chunk=16", "budget.steps=60", "train.lr=1e-2",
                  "objective=clm", "run.name=gdn")
    rows = helpers.metrics(lmtk_env.runs / "gdn")
    vals = [(r["step"], r["val/clm_loss"]) for r in rows if "val/clm_loss" in r]
    assert vals[0][0] == 0 and vals[-1][0] == 60, vals
    assert math.isfinite(vals[-1][1]) and vals[-1][1] < vals[0][1] - 1.0, vals


@pytest.mark.parametrize("gate", ["sigmoid", "exp"])
def test_mlstm_cell_stays_accurate_over_long_sequences_in_fp32(gate):
    """T = 600 with strong gates (forget pre-activations making m drift, input gates up to ~80):
    the fp32 chunked cell is as close to the fp64 per-step paper equations as the same equations
    run step by step in fp32 (h is ill-conditioned where |n^T q| is small, in both)."""
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 1, 2, 600, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    logi = 25 * torch.randn(B, H, T, generator=g, dtype=torch.float64)
    pre = 3 * torch.randn(B, H, T, generator=g, dtype=torch.float64)
    logf = F.logsigmoid(pre) if gate == "sigmoid" else 0.3 + 0.5 * pre  # exp gate: f > 1 on average, m grows
    ref = mlstm_paper(q, k, v, logi, logf)[0]
    h, _ = mlstm_cell(*(t.float() for t in (q, k, v, logi, logf)), chunk=64)
    steps = mlstm_paper(*(t.float() for t in (q, k, v, logi, logf)))[0]
    assert torch.isfinite(h).all()
    err, err_steps = (h.double() - ref).abs(), (steps.double() - ref).abs()
    assert err.max() <= 2 * err_steps.max() + 1e-4, (err.max(), err_steps.max())
    assert err.median() < 1e-5, err.median()


@pytest.mark.parametrize("gate", ["sigmoid", "exp"])
def test_mlstm_cell_gradients_equal_the_paper_equations(gate):
    """m is a constant to autograd in the cell; the paper's per-step form differentiates through
    it: the gradients agree (h does not depend on m). With the eps, they differ by O(eps)."""
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 1, 2, 13, 4
    ins = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]
    ins.append(3 * torch.randn(B, H, T, generator=g, dtype=torch.float64))
    pre = torch.randn(B, H, T, generator=g, dtype=torch.float64)
    ins.append(F.logsigmoid(pre) if gate == "sigmoid" else pre)
    w = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    grads = []
    # eps = 0: the eps added to the denominator (xLSTM's) is the one thing that is not invariant to m
    for fn in (lambda *a: mlstm_cell(*a, chunk=4, eps=0.0)[0], lambda *a: mlstm_paper(*a, eps=0.0)[0]):
        xs = [t.clone().requires_grad_() for t in ins]
        (fn(*xs) * w).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()
    xs = [t.clone().requires_grad_() for t in ins]
    (mlstm_cell(*xs, chunk=4)[0] * w).sum().backward()
    for x, b in zip(xs, grads[1]):
        assert torch.allclose(x.grad, b, atol=1e-4)


# --- the knobs every recurrent mixer has: conv (size, 0 = none) and output_gate -------------------

RECURRENT = ["linear", "retnet", "gla", "hgrn2", "metala", "mamba2", "mlstm", "gdn"]
SMALL = {"hgrn2": {"expand_ratio": 8}, "mamba2": {"d_state": 8}, "linear": {"feature_dim": 4}}


def one_layer(name: str, **knobs):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, positions="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False, mixer={"name": name, "chunk": 4, **SMALL.get(name, {}), **knobs})
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("name", RECURRENT)
def test_every_recurrent_mixer_has_conv_and_output_gate_knobs(name):
    """Defaults as the conf files (the papers'); conv=0 has no conv parameters and conv=3 a
    3-tap depthwise conv; output_gate=false has fewer parameters than true (no gate projection, or
    no z in the fused in-projection)."""
    defaults = dataclasses.asdict(MIXERS[name].Config())
    conf = yaml.safe_load((helpers.REPO / "conf" / "model" / "mixer" / f"{name}.yaml").read_text())
    assert {k: conf[k] for k in ("conv", "output_gate", "kernel")} == {k: defaults[k] for k in ("conv", "output_gate", "kernel")}
    no_conv, conv = (one_layer(name, conv=c).blocks[1].mixer for c in (0, 3))
    assert no_conv.conv is None and not any("conv" in n for n, _ in no_conv.named_parameters())
    assert conv.conv.weight.shape[-1] == 3 and conv.conv.weight.shape[0] > 1
    count = lambda m: sum(p.numel() for p in m.parameters())
    gated, plain = (one_layer(name, output_gate=g).blocks[1].mixer for g in (True, False))
    assert count(gated) > count(plain)
    assert (gated.gate is not None) == (name not in ("mamba2", "mlstm")) and plain.gate is None
    if name in ("mamba2", "mlstm"):  # the gate's z comes out of the fused in-projection
        assert gated.z_width > 0 and plain.z_width == 0


@pytest.mark.parametrize("name", RECURRENT)
def test_decoding_equals_full_forward_with_the_knobs_flipped(name):
    """The conv and the gate each flipped from the paper's default: a chunked prefill (carried conv
    state and S), then one token at a time, equals the full forward; the flipped model differs."""
    defaults = MIXERS[name].Config()
    flipped = {"conv": 0 if defaults.conv else 3, "output_gate": not defaults.output_gate}
    for knobs in ({"conv": flipped["conv"]}, {"output_gate": flipped["output_gate"]}, flipped):
        m = one_layer(name, **knobs)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
            x = ids(15)
            full = m(x)
            cache = m.new_cache()
            got = torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, 15)], 1)
        assert torch.allclose(got, full, atol=1e-4), (knobs, (got - full).abs().max())


@pytest.mark.parametrize("name", ["metala", "mamba2", "mlstm", "gdn"])
def test_knob_ranges_are_one_line_errors(name):
    for knobs, needle in (({"conv": -1}, "model.mixer.conv=-1"), ({"chunk": 0}, "model.mixer.chunk=0"),
                          ({"kernel": "triton"}, "model.mixer.kernel=triton is not one of: auto, torch, fla")):
        with pytest.raises(UserError, match=needle) as err:
            one_layer(name, **knobs)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,knobs,needle", [
    ("mamba2", {"expand": 0}, "model.mixer.expand=0, d_state=8 for mixer mamba2: both must be >= 1"),
    ("mamba2", {"groups": 3}, "model.mixer.groups=3 for mixer mamba2: must divide its 2 heads"),
    ("mlstm", {"expand": 0}, "model.mixer.expand=0 for mixer mlstm: must be >= 1"),
    ("gdn", {"expand_v": 0.0}, "for mixer gdn: gives heads of 16 / 0 channels"),
    ("metala", {"decay_norm": 0.0}, "model.mixer.decay_norm=0.0 for mixer metala: must be > 0"),
])
def test_width_knobs_are_one_line_errors(name, knobs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as err:
        one_layer(name, **knobs)
    assert "\n" not in str(err.value)


def test_short_conv_is_the_causal_depthwise_conv1d():
    """ShortConv (fused multiply-adds over time slices) equals F.conv1d on the left-padded input, in
    fp64, with its gradients; a state carried across a split continues it exactly."""
    from lmtk.models.mixers.common import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, 4, activation=False).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64, requires_grad=True)
    y, _ = conv(x)
    full = torch.cat([x.new_zeros(2, 3, 6), x], 1)
    ref = F.conv1d(full.transpose(1, 2), conv.weight, conv.bias, groups=6).transpose(1, 2)
    assert torch.allclose(y, ref, atol=1e-12)
    w = torch.randn_like(y)
    ga = torch.autograd.grad((y * w).sum(), [x, conv.weight, conv.bias])
    gb = torch.autograd.grad((ref * w).sum(), [x, conv.weight, conv.bias])
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb))
    y1, s = conv(x[:, :5], decode=True)
    y2, _ = conv(x[:, 5:], s, decode=True)
    assert torch.allclose(torch.cat([y1, y2], 1), ref, atol=1e-12)


@pytest.mark.parametrize("name, sizes", [("gla", None), ("linear", None), ("metala", None), ("gdn", None)])
def test_checkpoints_of_the_per_input_conv_layout_still_load(name, sizes):
    """State dicts written before the mixers shared one conv over their concatenated inputs
    (convs.0/1/2) and before metala/gdn's g_proj/out_proj became gate/out load unchanged."""
    from lmtk.models import LanguageModel, ModelConfig

    knobs = {"conv": 4} if name in ("gla", "linear") else {}
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32, positions="rope", rope_layout="half",
                      norm="rmsnorm", mlp="swiglu", bias=False, mixer={"name": name, **knobs})
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    legacy = {}
    mixer = model.blocks[0].mixer
    for k, v in model.state_dict().items():
        if name in ("gla", "linear") and k.startswith("blocks.0.mixer.conv."):
            what = k.rsplit(".", 1)[1]
            widths = [mixer.q.out_features, mixer.k.out_features, mixer.v.out_features]
            for i, part in enumerate(v.split(widths, dim=0)):
                legacy[f"blocks.0.mixer.convs.{i}.{what}"] = part.clone()
        elif name in ("metala", "gdn") and k.startswith(("blocks.0.mixer.gate.", "blocks.0.mixer.out.")):
            legacy[k.replace("mixer.gate.", "mixer.g_proj.").replace("mixer.out.", "mixer.out_proj.")] = v.clone()
        else:
            legacy[k] = v.clone()
    assert set(legacy) != set(model.state_dict())  # the legacy names really differ
    torch.manual_seed(1)
    fresh = LanguageModel(cfg).eval()
    fresh.load_state_dict(legacy)  # strict
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
