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
    assert old.mixer == {"name": "attention"} and old.layer_mixers() == ["attention", "attention"]
    torch.manual_seed(0)
    a = LanguageModel(old)
    torch.manual_seed(0)
    b = LanguageModel(ModelConfig.from_dict(dict(old.to_dict(), layers=["attention", "attention"])))
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(a(ids), b(ids))
