"""The shared gated linear recurrence (lmtk/models/mixers/recurrence.py) and the gated delta rule
(lmtk/models/mixers/delta.py): chunked == recurrent == naive in outputs, final states and
gradients, for every decay shape; state carried across calls; causality; strong decays; and,
when flash-linear-attention is installed, agreement with its pure-PyTorch naive references."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmtk.models.mixers import delta, recurrence

B, H, DK, DV = 2, 2, 8, 6
F64 = torch.float64
KINDS = ["none", "head", "scalar", "channel", "channel_exact"]  # channel_exact: the exact per-channel path
DELTA_KINDS = ["none", "head", "scalar"]


def make(kind, T=37, dtype=F64, strength=1.0, seed=0, gated_delta=False):
    """Random inputs: a dict of q, k, v, g (per `kind`), state, and beta / unit k for the delta rule."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)
    x = dict(q=r(B, H, T, DK), k=r(B, H, T, DK), v=r(B, H, T, DV), state=r(B, H, DK, DV))
    x["g"] = {
        "none": None,
        "head": -strength * u(H),
        "scalar": -strength * u(B, H, T),
        "channel": -strength * u(B, H, T, DK),
        "channel_exact": -strength * u(B, H, T, DK),
    }[kind]
    if gated_delta:
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = u(B, H, T)
    return x


@pytest.fixture
def exact_channel_path(monkeypatch, request):
    """For kind 'channel_exact', make the per-channel fast path unavailable."""
    if getattr(request, "param", None) == "channel_exact":
        for dt in (torch.float32, torch.float64):
            monkeypatch.setitem(recurrence.FACTOR_LIMIT, dt, -1.0)


def time_slice(x, sl):
    """Steps `sl` of every per-step input (q, k, v, beta, g unless it is per head)."""
    return {n: t[:, :, sl] if t is not None and n != "state" and t.dim() >= 3 else t for n, t in x.items()}


def run(fn, x, **kw):
    """fn on leaf copies of x; returns (o, state, grads) for one random linear readout of o and state."""
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    o, S = fn(**{**x, **leaves}, **kw)
    gen = torch.Generator().manual_seed(123)
    w = lambda t: torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)  # same weights in any dtype
    loss = (o * w(o)).sum() + (S * w(S)).sum()
    loss.backward()
    return o.detach(), S.detach(), {n: t.grad for n, t in leaves.items()}


def assert_same(a, b, atol=1e-10, rtol=1e-8):
    (oa, sa, ga), (ob, sb, gb) = a, b
    torch.testing.assert_close(oa, ob, atol=atol, rtol=rtol)
    torch.testing.assert_close(sa, sb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=rtol, msg=lambda m: f"grad {n}: {m}")


# --- the gated linear recurrence -------------------------------------------------------------


@pytest.mark.parametrize("exact_channel_path", KINDS, indirect=True)
@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("T", [37, 70])
def test_chunked_matches_naive(exact_channel_path, chunk, T, request):
    kind = request.node.callspec.params["exact_channel_path"]
    x = make(kind, T=T)
    assert_same(run(recurrence.chunked, x, chunk=chunk, scale=0.3), run(recurrence.naive, x, scale=0.3))


@pytest.mark.parametrize("exact_channel_path", KINDS, indirect=True)
@pytest.mark.parametrize("form", ["chunked", "recurrent", "naive"])
def test_shared_qk_equals_the_per_head_copies(exact_channel_path, form, request):
    """q, k [B, 1, T, Dk] shared by every head (Mamba-2's one group): each form equals the same
    form on q, k copied per head, in outputs, states and gradients (a shared q's gradient is the
    sum of its copies'), and chunked == naive on the shared inputs."""
    kind = request.node.callspec.params["exact_channel_path"]
    x = make(kind, T=37)
    shared = {**x, "q": x["q"][:, :1], "k": x["k"][:, :1]}
    kw = dict(chunk=8, scale=0.3) if form == "chunked" else dict(scale=0.3)
    fn = getattr(recurrence, form)
    o, S, grads = run(fn, shared, **kw)
    leaves = {n: t.clone().requires_grad_() for n, t in shared.items() if t is not None}
    copies = {**leaves, "q": leaves["q"].expand(B, H, -1, -1), "k": leaves["k"].expand(B, H, -1, -1)}
    o2, S2 = fn(**{**x, **copies}, **kw)
    gen = torch.Generator().manual_seed(123)
    w = lambda t: torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)
    ((o2 * w(o2)).sum() + (S2 * w(S2)).sum()).backward()
    assert grads["q"].shape == (B, 1, 37, DK)
    assert_same((o, S, grads), (o2.detach(), S2.detach(), {n: t.grad for n, t in leaves.items()}))
    if form == "chunked":
        assert_same((o, S, grads), run(recurrence.naive, shared, scale=0.3))


def test_q_k_head_counts_are_checked():
    x = make("scalar")
    with pytest.raises(ValueError, match="H=2 or 1"):
        recurrence.chunked(**{**x, "k": torch.cat([x["k"], x["k"]], 1)})


@pytest.mark.parametrize("kind", KINDS[:4])
def test_recurrent_matches_naive(kind):
    x = make(kind, T=37)
    assert_same(run(recurrence.recurrent, x, scale=0.3), run(recurrence.naive, x, scale=0.3))


def test_no_initial_state_is_zeros():
    x = make("channel")
    x0 = {**x, "state": torch.zeros_like(x["state"])}
    for fn in (recurrence.chunked, recurrence.recurrent, recurrence.naive):
        o, S = fn(**{**x, "state": None})
        o0, S0 = fn(**x0)
        torch.testing.assert_close(o, o0)
        torch.testing.assert_close(S, S0)


@pytest.mark.parametrize("kind", KINDS[:4])
def test_state_carries_across_calls(kind):
    """chunked(prefix) -> state -> chunked(rest, state) == chunked(all), split off a chunk boundary;
    and a chunked prefix followed by one-token recurrent decoding steps."""
    T, cut, chunk = 37, 13, 8
    x = make(kind, T=T)
    full_o, full_S = recurrence.chunked(**x, chunk=chunk)
    part = lambda sl: time_slice(x, sl)
    a, b = part(slice(0, cut)), part(slice(cut, T))
    o1, S1 = recurrence.chunked(**a, chunk=chunk)
    o2, S2 = recurrence.chunked(**{**b, "state": S1}, chunk=chunk)
    torch.testing.assert_close(torch.cat([o1, o2], 2), full_o)
    torch.testing.assert_close(S2, full_S)
    S, outs = S1, [o1]
    for t in range(cut, T):
        o, S = recurrence.recurrent(**{**part(slice(t, t + 1)), "state": S})
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full_o)
    torch.testing.assert_close(S, full_S)


@pytest.mark.parametrize("exact_channel_path", KINDS, indirect=True)
def test_causal(exact_channel_path, request):
    """Changing inputs from step t0 on changes no output before t0 (t0 inside a chunk)."""
    kind = request.node.callspec.params["exact_channel_path"]
    T, t0 = 70, 21
    x, y = make(kind, T=T, seed=0), make(kind, T=T, seed=1)
    z = {n: t.clone() if t is not None else None for n, t in x.items()}
    for n in "qkv":
        z[n][:, :, t0:] = y[n][:, :, t0:]
    if kind not in ("none", "head"):
        z["g"][:, :, t0:] = y["g"][:, :, t0:]
    for fn in (lambda **a: recurrence.chunked(**a, chunk=16), recurrence.recurrent):
        ox, oz = fn(**x)[0], fn(**z)[0]
        torch.testing.assert_close(ox[:, :, :t0], oz[:, :, :t0], atol=1e-12, rtol=0)
        assert not torch.allclose(ox[:, :, t0:], oz[:, :, t0:])


@pytest.mark.parametrize("kind", ["head", "scalar", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_strong_decays(kind, dtype):
    """g down to -20 per step (per-channel: also -60, i.e. the exact path): finite, and equal to the
    fp64 reference; fp32 chunks see exponents that would overflow if factored as e^{b} e^{-b}."""
    for strength in (20.0, 60.0) if kind == "channel" else (20.0,):
        x = make(kind, T=70, dtype=dtype, strength=strength)
        x64 = {n: t.double() if t is not None else None for n, t in x.items()}
        ref = run(recurrence.naive, x64)
        forms = ((recurrence.chunked, dict(chunk=64)), (recurrence.chunked, dict(chunk=16)), (recurrence.recurrent, {}))
        for fn, kw in forms:
            got = run(fn, x, **kw)
            for t in (got[0], got[1], *got[2].values()):
                assert torch.isfinite(t).all()
            tol = dict(atol=1e-10, rtol=1e-8) if dtype == F64 else dict(atol=2e-5, rtol=2e-5)
            assert_same(tuple(_double(t) for t in got), ref, **tol)


def _double(t):
    return {n: v.double() for n, v in t.items()} if isinstance(t, dict) else t.double()


def test_channel_chunk_shrinks_for_the_fast_path(monkeypatch):
    """Per-channel decays too strong for one factorised 64-step chunk in fp32 (mean g = -2) run
    at a shorter chunk on the fast path, not on the exact one, and still match."""
    x = make("channel", T=70, dtype=torch.float32, strength=4.0)
    g = recurrence.log_decay(x["g"], B, H, 70, DK, torch.float32)
    C, fast = recurrence._channel_chunk(g, 64)
    assert fast and C in (8, 16)
    monkeypatch.setattr(recurrence, "_intra_channel_exact", None)  # would raise if taken
    got = run(recurrence.chunked, x, chunk=64)
    ref = run(recurrence.naive, {n: t.double() if t is not None else None for n, t in x.items()})
    assert_same(tuple(_double(t) for t in got), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "scalar", "channel"])
def test_fp32_matches_fp64_reference(kind):
    x = make(kind, T=70, dtype=torch.float32)
    x64 = {n: t.double() if t is not None else None for n, t in x.items()}
    ref = run(recurrence.naive, x64, scale=DK**-0.5)
    for chunk in (16, 64):
        got = run(recurrence.chunked, x, chunk=chunk, scale=DK**-0.5)
        assert got[0].dtype == torch.float32
        assert_same(tuple(_double(t) for t in got), ref, atol=1e-5, rtol=1e-5)


def test_low_precision_inputs():
    """bf16 in -> bf16 out, fp32 state; scale is applied to q."""
    x = make("channel", dtype=torch.float32)
    xb = {n: t.bfloat16() if t is not None and n != "state" else t for n, t in x.items()}
    o, S = recurrence.chunked(**xb, chunk=16, scale=0.5)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ref_o, ref_S = recurrence.naive(**{n: t.float() if t is not None else None for n, t in xb.items()}, scale=0.5)
    torch.testing.assert_close(o.float(), ref_o, atol=0.05, rtol=0.02)
    torch.testing.assert_close(S, ref_S, atol=1e-4, rtol=1e-4)
    o2, _ = recurrence.chunked(**{**x, "q": 0.5 * x["q"]}, chunk=16)
    torch.testing.assert_close(recurrence.chunked(**x, chunk=16, scale=0.5)[0], o2)


def test_batch_one_decay_broadcasts():
    x = make("scalar")
    g1 = x["g"][:1]
    o, S = recurrence.chunked(**{**x, "g": g1}, chunk=8)
    o_ref, S_ref = recurrence.naive(**{**x, "g": g1.expand(B, H, -1)})
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


@pytest.mark.parametrize("shape", [(H + 1,), (B, H, 5), (B, H, 37, DK + 1), (B, H)])
def test_bad_decay_shape(shape):
    x = make("none")
    with pytest.raises(ValueError, match="log-decay"):
        recurrence.chunked(**{**x, "g": -torch.rand(*shape, dtype=F64)})


# --- the gated delta rule ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("T", [37, 70])
def test_delta_chunked_matches_naive(kind, chunk, T):
    x = make(kind, T=T, gated_delta=True)
    assert_same(run(delta.chunked, x, chunk=chunk, scale=0.3), run(delta.naive, x, scale=0.3))


@pytest.mark.parametrize("kind", DELTA_KINDS)
def test_delta_recurrent_matches_naive(kind):
    x = make(kind, T=37, gated_delta=True)
    assert_same(run(delta.recurrent, x, scale=0.3), run(delta.naive, x, scale=0.3))


@pytest.mark.parametrize("kind", DELTA_KINDS)
def test_delta_state_carries_across_calls(kind):
    T, cut, chunk = 37, 13, 8
    x = make(kind, T=T, gated_delta=True)
    full_o, full_S = delta.chunked(**x, chunk=chunk)
    part = lambda sl: time_slice(x, sl)
    o1, S1 = delta.chunked(**part(slice(0, cut)), chunk=chunk)
    o2, S2 = delta.chunked(**{**part(slice(cut, T)), "state": S1}, chunk=chunk)
    torch.testing.assert_close(torch.cat([o1, o2], 2), full_o)
    torch.testing.assert_close(S2, full_S)
    S, outs = S1, [o1]
    for t in range(cut, T):
        o, S = delta.recurrent(**{**part(slice(t, t + 1)), "state": S})
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full_o)
    torch.testing.assert_close(S, full_S)


@pytest.mark.parametrize("kind", DELTA_KINDS)
def test_delta_causal(kind):
    T, t0 = 70, 21
    x, y = make(kind, T=T, seed=0, gated_delta=True), make(kind, T=T, seed=1, gated_delta=True)
    z = {n: t.clone() if t is not None else None for n, t in x.items()}
    for n in ("q", "k", "v", "beta") + (("g",) if kind == "scalar" else ()):
        z[n][:, :, t0:] = y[n][:, :, t0:]
    for fn in (lambda **a: delta.chunked(**a, chunk=16), delta.recurrent):
        ox, oz = fn(**x)[0], fn(**z)[0]
        torch.testing.assert_close(ox[:, :, :t0], oz[:, :, :t0], atol=1e-12, rtol=0)
        assert not torch.allclose(ox[:, :, t0:], oz[:, :, t0:])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_delta_strong_decays(dtype):
    x = make("scalar", T=70, dtype=dtype, strength=20.0, gated_delta=True)
    x64 = {n: t.double() if t is not None else None for n, t in x.items()}
    ref = run(delta.naive, x64)
    for fn, kw in ((delta.chunked, dict(chunk=64)), (delta.chunked, dict(chunk=16)), (delta.recurrent, {})):
        got = run(fn, x, **kw)
        for t in (got[0], got[1], *got[2].values()):
            assert torch.isfinite(t).all()
        tol = dict(atol=1e-10, rtol=1e-8) if dtype == F64 else dict(atol=2e-5, rtol=2e-5)
        assert_same(tuple(_double(t) for t in got), ref, **tol)


@pytest.mark.parametrize("kind", ["none", "scalar"])
def test_delta_fp32_matches_fp64_reference(kind):
    x = make(kind, T=70, dtype=torch.float32, gated_delta=True)
    x64 = {n: t.double() if t is not None else None for n, t in x.items()}
    ref = run(delta.naive, x64, scale=DK**-0.5)
    for chunk in (16, 64):
        got = run(delta.chunked, x, chunk=chunk, scale=DK**-0.5)
        assert_same(tuple(_double(t) for t in got), ref, atol=1e-5, rtol=1e-5)


def test_delta_rejects_per_channel_decay():
    x = make("channel", gated_delta=True)
    with pytest.raises(ValueError, match="per head"):
        delta.chunked(**x)


# --- flash-linear-attention's naive references (skipped without fla) ---------------------------


def fla_naive(name):
    """fla.ops.<name>.naive. Without Triton (CPU) the fla.ops package itself does not import, but
    the naive files need only torch and einops, so load the file on its own then."""
    pytest.importorskip("einops")  # fla-core and einops are in the dev extra: these run in CI
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention (fla-core) is not installed")
    try:
        return importlib.import_module(f"fla.ops.{name}.naive")
    except Exception:
        path = Path(spec.submodule_search_locations[0]) / "ops" / name / "naive.py"
        assert path.exists(), f"this fla has no {path}"
        mod_spec = importlib.util.spec_from_file_location(f"_fla_naive_{name}", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod


def fla_inputs(T=70, gated_delta=False, decay="scalar", seed=3):
    """fla's naive references compute in fp32 whatever they are given: compare in fp32."""
    return make(decay, T=T, dtype=torch.float32, seed=seed, gated_delta=gated_delta)


def bthd(t):
    """Our head-first [B, H, T, ...] -> fla's default [B, T, H, ...]."""
    return t.transpose(1, 2).contiguous()


TOL32 = dict(atol=1e-4, rtol=1e-4)


def test_fla_gla():
    m = fla_naive("gla")
    x = fla_inputs(decay="channel")
    o_ref, S_ref = m.naive_recurrent_gla(
        bthd(x["q"]), bthd(x["k"]), bthd(x["v"]), bthd(x["g"]), initial_state=x["state"], output_final_state=True
    )
    o, S = recurrence.chunked(**x, chunk=16, scale=DK**-0.5)
    torch.testing.assert_close(bthd(o), o_ref, **TOL32)
    torch.testing.assert_close(S, S_ref, **TOL32)


def test_fla_simple_gla():
    m = fla_naive("simple_gla")
    x = fla_inputs(decay="scalar")
    args = (bthd(x["q"]), bthd(x["k"]), bthd(x["v"]), bthd(x["g"]))
    o_ref, S_ref = m.naive_recurrent_simple_gla(
        *args, scale=DK**-0.5, initial_state=x["state"], output_final_state=True
    )
    o_chk, S_chk = m.naive_chunk_simple_gla(
        *args, initial_state=x["state"], output_final_state=True, chunk_size=16, scale=DK**-0.5
    )
    o, S = recurrence.chunked(**x, chunk=16, scale=DK**-0.5)
    for oo, SS in ((o_ref, S_ref), (o_chk, S_chk)):
        torch.testing.assert_close(bthd(o), oo, **TOL32)
        torch.testing.assert_close(S, SS, **TOL32)


def test_fla_retention():
    """RetNet: a fixed decay per head, gamma_h = 1 - 2^(-5-h) (fla's naive retention is head-first)."""
    m = fla_naive("retention")
    x = fla_inputs(decay="none")
    o_ref = m.naive_retention(x["q"], x["k"], x["v"])
    g = torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))))
    o, _ = recurrence.chunked(x["q"], x["k"], x["v"], g, chunk=16, scale=DK**-0.5)
    torch.testing.assert_close(o, o_ref, **TOL32)


def test_fla_linear_attn():
    m = fla_naive("linear_attn")
    x = fla_inputs(decay="none")
    o_ref, S_ref = m.naive_recurrent_linear_attn(
        bthd(x["q"]), bthd(x["k"]), bthd(x["v"]), scale=DK**-0.5, initial_state=x["state"], output_final_state=True
    )
    o, S = recurrence.chunked(**x, chunk=16, scale=DK**-0.5)
    torch.testing.assert_close(bthd(o), o_ref, **TOL32)
    torch.testing.assert_close(S, S_ref, **TOL32)


def test_fla_delta_rule():
    """fla's DeltaNet references are head-first; the chunkwise one needs T % chunk == 0, no state."""
    m = fla_naive("delta_rule")
    x = fla_inputs(T=64, decay="none", gated_delta=True)
    o_ref, S_ref = m.delta_rule_recurrence(x["q"], x["k"], x["v"], x["beta"], initial_state=x["state"])
    o, S = delta.chunked(**x, chunk=16, scale=DK**-0.5)
    torch.testing.assert_close(o, o_ref, **TOL32)
    torch.testing.assert_close(S, S_ref, **TOL32)
    o_chk, S_chk = m.delta_rule_chunkwise(x["q"], x["k"], x["v"], x["beta"], chunk_size=16)
    o0, S0 = delta.chunked(**{**x, "state": None}, chunk=32, scale=DK**-0.5)
    torch.testing.assert_close(o0, o_chk, **TOL32)
    torch.testing.assert_close(S0, S_chk, **TOL32)


def test_fla_gated_delta_rule():
    m = fla_naive("gated_delta_rule")
    x = fla_inputs(decay="scalar", gated_delta=True)
    q, k, v, beta, g = (bthd(x[n]) for n in ("q", "k", "v", "beta", "g"))
    o_ref, S_ref = m.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, scale=DK**-0.5, initial_state=x["state"], output_final_state=True
    )
    o_chk, S_chk = m.naive_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=16, scale=DK**-0.5, initial_state=x["state"], output_final_state=True
    )
    o, S = delta.chunked(**x, chunk=16, scale=DK**-0.5)
    for oo, SS in ((o_ref, S_ref), (o_chk, S_chk)):
        torch.testing.assert_close(bthd(o), oo, **TOL32)
        torch.testing.assert_close(S, SS, **TOL32)
