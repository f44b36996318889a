"""LanguageModel: causality, bidirectionality, tied head, shapes, vocabulary padding."""

from __future__ import annotations

import pytest
import torch

from lmtk.errors import UserError
from lmtk.models import LanguageModel, ModelConfig, build_model, model_config, padded_vocab

V, T, B = 128, 16, 2
VARIANTS = [
    dict(positions=p, norm_position=n, norm=norm, mlp=mlp)
    for p in ("learned", "sinusoidal", "rope", "none")
    for n, norm, mlp in (("pre", "rmsnorm", "swiglu"), ("post", "layernorm", "gelu"))
]
IDS = [f"{v['positions']}-{v['norm_position']}" for v in VARIANTS]


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, **kw})
    return build_model(cfg).eval()


def _perturb_after(idx: torch.Tensor, t: int) -> torch.Tensor:
    """Same tokens up to and including position t, different ones after it."""
    out = idx.clone()
    out[:, t + 1 :] = (idx[:, t + 1 :] + 1 + torch.arange(T - t - 1)) % V
    assert (out[:, t + 1 :] != idx[:, t + 1 :]).all()
    return out


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_causal_output_ignores_future_tokens(kw):
    model = tiny(**kw)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx, causal=True)
        for t in (0, 5, T - 2):
            out = model(_perturb_after(idx, t), causal=True)
            torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], rtol=1e-5, atol=1e-5)
            # and the future positions do see the change (the test can fail)
            assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :])


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_bidirectional_output_sees_future_tokens(kw):
    model = tiny(**kw)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(idx, causal=False)
        out = model(_perturb_after(idx, 5), causal=False)
    # every position up to t=5 changes once later tokens change
    diff = (out[:, :6] - ref[:, :6]).abs().amax(dim=-1)
    assert (diff > 1e-6).all()


def _permuted(model):
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return model(idx[:, perm], causal=False), model(idx, causal=False)[:, perm]


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope"])
def test_positions_make_output_order_dependent(positions):
    """With position information, shuffling the tokens is not just shuffling the outputs."""
    a, b = _permuted(tiny(positions=positions))
    assert not torch.allclose(a, b, atol=1e-4)


def test_no_positions_is_permutation_equivariant_bidirectionally():
    a, b = _permuted(tiny(positions="none"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tied_head_shares_embedding_weight():
    model = tiny()
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    n_unique = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates
    untied = tiny(tie_embeddings=False)
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) == n_unique + V * 32
    # a gradient step through the head moves the embedding too
    idx = torch.randint(0, V, (B, T))
    model.train()
    model(idx).sum().backward()
    assert model.embed.weight.grad is not None


@pytest.mark.parametrize("kw", VARIANTS[:2], ids=IDS[:2])
def test_shapes(kw):
    model = tiny(**kw)
    idx = torch.randint(0, V, (3, 10))
    h = model.hidden(idx)
    assert h.shape == (3, 10, 32)
    assert model.logits(h).shape == (3, 10, V)
    assert model(idx).shape == (3, 10, V)
    assert model(idx, causal=False).shape == (3, 10, V)
    assert model.logits(h[:, [1, 4]]).shape == (3, 2, V)  # sparse prediction: head on a subset


@pytest.mark.parametrize("mlp,d_ff", [("gelu", 4 * 48), ("swiglu", 128), ("gated-gelu", 128)])
def test_default_d_ff(mlp, d_ff):
    assert ModelConfig(vocab_size=V, d_model=48, mlp=mlp).d_ff == d_ff


def test_padded_vocab_and_model_config():
    assert padded_vocab(1000) == 1024 and padded_vocab(1024) == 1024 and padded_vocab(1) == 64
    cfg = model_config({"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": None, "unknown_key": 1}, 1000)
    assert cfg.vocab_size == 1024
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        model_config({"d_model": 32, "vocab_size": 500}, 1000)


def test_model_config_roundtrip():
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, positions="rope")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    """With the flag each block runs twice per step (forward, then again in backward instead of
    keeping its activations); without it once. Same gradients either way."""
    batch = torch.randint(5, V, (2, 16))
    grads, calls = [], []
    for ckpt in (False, True):
        m = tiny()  # same seed, same weights
        m.train()
        m.activation_checkpointing = ckpt
        n = [0]
        for block in m.blocks:  # count calls of forward itself (the recompute skips module hooks)
            def counted(*a, _forward=block.forward, **k):
                n[0] += 1
                return _forward(*a, **k)

            block.forward = counted
        m(batch).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        calls.append(n[0])
        with torch.no_grad():  # evaluation never recomputes
            n[0] = 0
            m(batch)
            assert n[0] == len(m.blocks)
    assert calls == [len(m.blocks), 2 * len(m.blocks)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))



@pytest.mark.parametrize("norm,kind,usual", [("layernorm", torch.nn.LayerNorm, 1e-5), ("rmsnorm", None, 1e-6)])
def test_norm_eps_reaches_every_norm_and_null_keeps_the_usual(norm, kind, usual):
    from lmtk.models.layers import RMSNorm

    kind = kind or RMSNorm

    def eps_of(model):
        norms = [m for m in model.modules() if isinstance(m, kind)]
        assert len(norms) == 2 * 2 + 2  # two per block, the embedding norm and the final norm
        return {n.eps for n in norms}

    assert eps_of(tiny(norm=norm, embedding_norm=True)) == {usual}
    assert eps_of(tiny(norm=norm, embedding_norm=True, norm_eps=1e-3)) == {1e-3}
    # a model.json written before the key existed rebuilds the same model
    old = ModelConfig(vocab_size=V, norm=norm).to_dict()
    del old["norm_eps"]
    assert ModelConfig.from_dict(old) == ModelConfig(vocab_size=V, norm=norm)
    assert ModelConfig.from_dict(old).norm_eps is None


def test_model_norm_eps_from_the_config():
    from lmtk.config import compose

    assert compose("cramming-bert", ["model.norm_eps=1e-12"]).model.norm_eps == 1e-12
    assert compose("default", []).model.norm_eps is None
    with pytest.raises(UserError, match="norm_eps"):
        compose("default", ["model.norm_eps=0"])
    cfg = model_config(compose("default", ["model.norm_eps=1e-4"]).model, 1000)
    assert build_model(cfg).final_norm.eps == 1e-4


def test_rope_beyond_max_seq_len_extends_the_table():
    """Generating past max_seq_len with rotary positions: the prefix's outputs do not change."""
    model = tiny(positions="rope", max_seq_len=16).eval()
    idx = torch.randint(5, V, (2, 24))
    with torch.no_grad():
        short, long = model(idx[:, :16]), model(idx)
    torch.testing.assert_close(long[:, :16], short)
    assert model.blocks[0].mixer.rotary.cos.shape[0] == 16


def test_old_model_json_with_a_mixer_name_loads_and_layer_patterns_build():
    """model.json written before mixers had knobs says "mixer": "attention"; a list of names
    per layer builds the same model as no pattern."""
    from lmtk.models import ModelConfig

    old = ModelConfig.from_dict({"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "mixer": "attention"})
    assert old.mixer == {"name": "attention", "kv_shift": False} and old.layer_mixers() == ["attention", "attention"]
    torch.manual_seed(0)
    a = LanguageModel(old)
    torch.manual_seed(0)
    b = LanguageModel(ModelConfig.from_dict(dict(old.to_dict(), layers=["attention", "attention"])))
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_beyond_max_seq_len_in_each_layout(layout):
    model = tiny(positions="rope", max_seq_len=16, rope_layout=layout).eval()
    idx = torch.randint(5, V, (2, 24))
    with torch.no_grad():
        short, long = model(idx[:, :16]), model(idx)
    torch.testing.assert_close(long[:, :16], short)


def _interleaved_rope_reference(x, cos, sin):
    """RoFormer's rotation as lmtk wrote it before issue 16: pairs (2i, 2i+1)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def test_interleaved_layout_is_the_old_rotation():
    """A model.json written before model.rope_layout (no key) means the interleaved layout, and
    that layout still computes the old rotation: old checkpoints give their old logits."""
    old = tiny(positions="rope").cfg.to_dict()
    del old["rope_layout"]
    assert ModelConfig.from_dict(old).rope_layout == "interleaved"
    rot = build_model(ModelConfig.from_dict(old)).blocks[0].mixer.rotary
    x = torch.randn(2, 2, 8, 16)
    cos, sin = rot.cos_sin(8, x.dtype)
    torch.testing.assert_close(rot(x, cos, sin), _interleaved_rope_reference(x, cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_half_rope_layout_is_the_interleaved_one_up_to_a_permutation(bias):
    """The half layout with q/k projection rows permuted per head (convert_rope_layout) is the
    same function as the interleaved layout: logits and every gradient (permuted back) agree to
    float rounding; converting back is exact."""
    from lmtk.models.layers import convert_rope_layout

    old = tiny(positions="rope", norm="rmsnorm", mlp="swiglu", bias=bias, rope_layout="interleaved").train()
    new = tiny(positions="rope", norm="rmsnorm", mlp="swiglu", bias=bias, rope_layout="half").train()
    assert new.blocks[0].mixer.rotary.layout == "half" and old.blocks[0].mixer.rotary.layout == "interleaved"
    new.load_state_dict(convert_rope_layout(old.state_dict(), old.cfg))
    assert not torch.equal(new.blocks[0].mixer.qkv.weight, old.blocks[0].mixer.qkv.weight)
    idx = torch.randint(5, V, (B, T))
    for m in (old, new):
        torch.nn.functional.cross_entropy(m(idx).reshape(-1, V), idx.roll(-1, 1).reshape(-1)).backward()
    torch.testing.assert_close(new(idx), old(idx), rtol=1e-5, atol=1e-5)
    grads_old = convert_rope_layout({k: p.grad for k, p in old.named_parameters()}, old.cfg)
    for k, p in new.named_parameters():
        torch.testing.assert_close(p.grad, grads_old[k], rtol=1e-4, atol=1e-6, msg=k)
    back = convert_rope_layout(new.state_dict(), new.cfg, to="interleaved")
    for k, v in old.state_dict().items():
        assert torch.equal(back[k], v), k


def test_recipes_use_the_interleaved_rope_layout():
    from lmtk.config import compose

    assert compose("default", []).model.rope_layout == "interleaved"
    assert build_model(model_config(compose("default", []).model, 1000)).blocks[0].mixer.rotary.layout == "interleaved"
    with pytest.raises(UserError, match="rope_layout"):
        compose("default", ["model.rope_layout=diagonal"])
    with pytest.raises(ValueError, match="rope_layout"):
        ModelConfig(vocab_size=V, rope_layout="diagonal")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_equals_the_reference(dtype):
    """lmtk's RMSNorm (a hand-written backward on CPU) equals x * rsqrt(mean(x^2) + eps) * w and
    F.rms_norm to float rounding: output, input and weight gradients."""
    from lmtk.models.layers import RMSNorm, _RMSNormFn

    torch.manual_seed(0)
    x = (3 * torch.randn(4, 8, 48, dtype=dtype)).requires_grad_()
    g = torch.randn(4, 8, 48, dtype=dtype)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.mul_(1 + 0.3 * torch.randn(48, dtype=dtype))
    calls = []
    orig = _RMSNormFn.forward
    _RMSNormFn.forward = staticmethod(lambda *a: calls.append(1) or orig(*a))
    try:
        y = norm(x)
    finally:
        _RMSNormFn.forward = staticmethod(orig)
    assert calls, "the CPU path did not take the hand-written backward"
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    w = norm.weight.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    rx, rw = torch.autograd.grad(ref, (xd, w), g.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **{k: v * 10 for k, v in tol.items()})
    xf = x.detach().requires_grad_()
    yf = torch.nn.functional.rms_norm(xf, (48,), norm.weight, 1e-6)
    torch.testing.assert_close(y, yf)
    torch.testing.assert_close(gx, torch.autograd.grad(yf, xf, g)[0])


def test_rms_norm_in_half_precision_accumulates_in_fp32():
    """fp16 x^2 summed over 512 channels overflows: half precision takes F.rms_norm (fp32 inside)."""
    from lmtk.models.layers import rms_norm

    x = 20 * torch.randn(2, 512)
    w = torch.ones(512)
    want = torch.nn.functional.rms_norm(x, (512,), w, 1e-6)
    got = rms_norm(x.half(), w.half(), 1e-6)
    assert torch.isfinite(got).all() and (got.float() - want).abs().max() < 0.01


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rotary_takes_any_strides(layout):
    """Gradients of .sum() (every stride 0) and inputs at an odd storage offset go through the
    interleaved complex view as through the half layout's slices."""
    from lmtk.models.layers import Rotary

    rot = Rotary(8, 1e4, 16, layout)
    cos, sin = rot.cos_sin(6, torch.float32)
    x = torch.randn(2, 3, 6, 8, requires_grad=True)
    rot(x, cos, sin).sum().backward()
    assert torch.isfinite(x.grad).all()
    qkv = torch.randn(2, 6, 3, 3, 8, requires_grad=True)
    rot.rotate_qkv(qkv, cos, sin)[0].sum().backward()
    assert torch.isfinite(qkv.grad).all()
    odd = torch.randn(2 * 3 * 6 * 8 + 1)[1:].view(2, 3, 6, 8)
    torch.testing.assert_close(rot(odd, cos, sin), rot(odd.clone(), cos, sin))


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotary_qkv_op_equals_plain_rotation(layout, dtype):
    """Rotary.rotate_qkv (one op on the qkv view, gradients of q, k and v written into one buffer;
    the interleaved layout as a complex multiply) equals slicing q, k, v out and rotating q and k
    with plain tensor arithmetic: outputs and the qkv gradient, also when v is not used."""
    from lmtk.models.layers import Rotary

    torch.manual_seed(0)
    B_, T_, H, Dh = 2, 6, 2, 8
    rot = Rotary(Dh, 10000.0, 16, layout).to(dtype)
    cos, sin = rot.cos_sin(T_, dtype, offset=3)

    def plain(x):  # [..., Dh] at T_ positions (dim -3 is time in [B, T, H, Dh])
        c, s = cos[:, None, :].double(), sin[:, None, :].double()
        x = x.double()
        if layout == "half":
            a, b = x[..., : Dh // 2], x[..., Dh // 2:]
            return torch.cat((a * c - b * s, b * c + a * s), -1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)

    tol = dict(rtol=0, atol=0.02) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for use_v in (True, False):
        qkv = torch.randn(B_, T_, 3, H, Dh, dtype=dtype, requires_grad=True)
        gq, gv = torch.randn(B_, T_, 2, H, Dh, dtype=dtype), torch.randn(B_, T_, H, Dh, dtype=dtype)
        qk, v = rot.rotate_qkv(qkv, cos, sin)
        assert qk.dtype == dtype and qk.shape == (B_, T_, 2, H, Dh) and torch.equal(v, qkv[:, :, 2])
        ref = torch.stack([plain(qkv[:, :, i]) for i in (0, 1)], 2)
        torch.testing.assert_close(qk.double(), ref, **tol)
        ((qk * gq).sum() + ((v * gv).sum() if use_v else 0)).backward()
        ref_q = torch.stack(_rotate_back(gq, cos, sin, layout), 2)
        torch.testing.assert_close(qkv.grad[:, :, :2].double(), ref_q, **tol)
        assert torch.equal(qkv.grad[:, :, 2], gv if use_v else torch.zeros_like(gv))


def _rotate_back(g, cos, sin, layout):
    """The transpose of the rotation (rotation by -theta), per q / k slice, in float64."""
    c, s = cos[:, None, :].double(), -sin[:, None, :].double()
    out = []
    for i in (0, 1):
        x = g[:, :, i].double()
        if layout == "half":
            h = x.shape[-1] // 2
            a, b = x[..., :h], x[..., h:]
            out.append(torch.cat((a * c - b * s, b * c + a * s), -1))
        else:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out.append(torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2))
    return out


@pytest.mark.parametrize("kind", ["swiglu", "gated-gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_mlp_op_equals_autograd(kind, dtype):
    """The gated MLP's act(a) * b with its one-buffer backward equals plain autograd on the
    chunked halves: output and the gradient of both halves."""
    from lmtk.models.layers import activation, gated

    torch.manual_seed(0)
    h = torch.randn(3, 5, 2 * 12, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 12, dtype=dtype)
    y = gated(h, kind)
    y.backward(g)
    got = h.grad.clone()
    h.grad = None
    a, b = h.chunk(2, -1)
    ref = activation(kind)(a) * b
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(got, h.grad)
