"""muP (model.parametrization=mup, models/mup.py): the standard parametrisation at the base
width; at other widths exactly the prescribed differences (hidden init / sqrt(m), hidden Adam lr
/ m, logits / m, attention sqrt(d0)/d); a coordinate check; resume exact."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import helpers
from lmtk.models import LanguageModel, ModelConfig
from lmtk.train.optim import build_optimizer, set_lr

OPT = SimpleNamespace(weight_decay=0.1, betas=[0.9, 0.98], eps=1e-8)


def cfg(width: int, param: str = "standard", base: int | None = None, **kw) -> ModelConfig:
    kw = {"vocab_size": 64, "d_model": width, "n_layers": 2, "n_heads": 2, "d_ff": 2 * width, "positions": "rope",
          "rope_layout": "half", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, **kw}
    return ModelConfig(parametrization=param, mup_base_width=base, **kw)


def model(*a, seed: int = 0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(cfg(*a, **kw))


def test_at_the_base_width_mup_is_the_standard_model():
    """Same seed: the same weights, logits, training loss and optimizer groups as SP."""
    sp, mu = model(32), model(32, "mup", 32)
    for (n, a), b in zip(sp.state_dict().items(), mu.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 64, (2, 16))
    assert torch.allclose(sp(x), mu(x), atol=1e-6, rtol=0)
    h = mu.hidden(x)
    assert torch.allclose(sp.head_loss(h, x, dispatch=False), mu.head_loss(h, x, dispatch=False), atol=1e-6, rtol=0)
    g_sp, g_mu = (build_optimizer(m, OPT, 1e-3, torch.device("cpu")).param_groups for m in (sp, mu))
    assert [(len(g["params"]), g["lr"]) for g in g_sp] == [(len(g["params"]), g["lr"]) for g in g_mu]


def test_wider_than_the_base_differs_exactly_as_prescribed():
    """Width 64 over base 16 (m = 4), same seed: hidden matrices' init is SP's / 2 and the rest
    identical; at identical weights, muP's hidden states are SP's with the attention scale
    sqrt(d0)/d (d0 = 32/4 = 8, d = 32), and its logits (plain and fused head) are SP's / 4."""
    sp, mu = model(64), model(64, "mup", 16)
    hidden = set(mu.mup_hidden)
    assert hidden == {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("mixer.qkv", "mixer.out", "mlp.up", "mlp.down")}
    ws, wm = dict(sp.named_parameters()), dict(mu.named_parameters())
    for n in ws:
        assert torch.allclose(wm[n], ws[n] / (2 if n in hidden else 1)), n
    mu.load_state_dict(sp.state_dict())
    x = torch.randint(0, 64, (2, 16))
    for b in sp.blocks:
        assert b.mixer.scale is None and mu.blocks[0].mixer.scale == pytest.approx(math.sqrt(8) / 32)
        b.mixer.scale = math.sqrt(8) / 32
    h = mu.hidden(x)
    assert torch.allclose(h, sp.hidden(x), atol=1e-5, rtol=0)
    assert torch.allclose(mu.logits(h), sp.logits(h) / 4, atol=1e-6, rtol=0)
    targets = torch.randint(0, 64, (2, 16))
    want = F.cross_entropy(sp.logits(h).flatten(0, 1) / 4, targets.flatten())
    for dispatch in (False, True):  # the chunked fused head and the plain one
        assert torch.allclose(mu.head_loss(h, targets, dispatch=dispatch), want, atol=1e-5), dispatch


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_hidden_matrices_get_lr_times_base_over_width(mixer):
    """Adam lr x base/width on exactly the matrix-like parameters (a recurrent mixer's included,
    its low-rank gate factors not); embeddings, norms and the rest at the plain lr, after set_lr."""
    mu = model(64, "mup", 16, mixer={"name": mixer})
    opt = build_optimizer(mu, OPT, 1e-3, torch.device("cpu"))
    set_lr(opt, 2e-3)
    names = {id(p): n for n, p in mu.named_parameters()}
    in_groups = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(names.values())  # every parameter in exactly one group
    lr = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    scaled = {n for n, v in lr.items() if v == pytest.approx(2e-3 / 4)}
    assert scaled == set(mu.mup_hidden) and all(v == pytest.approx(2e-3) for n, v in lr.items() if n not in scaled)
    assert "embed.weight" not in scaled and "blocks.0.norm1.weight" not in scaled
    assert "blocks.0.mlp.up.weight" in scaled and "blocks.0.mixer.out.weight" in scaled
    if mixer == "gla":
        assert {"blocks.0.mixer.q.weight", "blocks.0.mixer.gate.weight"} <= scaled
        assert not any("gate_down" in n or "gate_up" in n for n in scaled)
    wd = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd["blocks.0.mlp.up.weight"] == 0.1 and wd["embed.weight"] == 0.0


@pytest.mark.parametrize("d_expert", [None, 8])
def test_moe_experts_are_hidden_and_the_router_is_a_readout(d_expert):
    """MoE under muP: every expert's matrices are hidden, with d_expert left to follow d_ff or set
    (a set width grows with the model too); the router (fan-in grows, E experts do not) keeps SP's
    init and lr and takes the readout multiplier, so its scores at init shrink as 1/sqrt(m) as the
    logits do (muP's readout; Adam's updates then move them by O(1)), where in SP they grow as sqrt(m)."""
    moe = {"experts": 4, "top_k": 2, "d_expert": d_expert}
    mu = model(64, "mup", 16, mlp="moe", moe=moe)
    experts = {f"blocks.{i}.mlp.experts.{e}.{p}.weight" for i in range(2) for e in range(4) for p in ("up", "down")}
    assert experts <= set(mu.mup_hidden) and not any("router" in n for n in mu.mup_hidden)

    def router_std(param, width):
        m = model(width, param, 16 if param == "mup" else None, mlp="moe", moe=moe)
        x = torch.randn(4096, width)  # unit-size coordinates, as the block's normalised input
        with torch.no_grad():
            return (m.blocks[0].mlp.router(x) * m.blocks[0].mlp.router_mult).std().item()

    sp, mu_ = [router_std("standard", w) for w in (16, 256)], [router_std("mup", w) for w in (16, 256)]
    assert mu_[0] == pytest.approx(sp[0], rel=1e-6)  # the base width is SP
    assert sp[1] / sp[0] > 3 and 1 / 1.5 < mu_[1] / mu_[0] * 4 < 1.5  # SP: x sqrt(16) = 4; muP: x 4 / 16


def _coords(param: str, width: int) -> float:
    """Mean |logit| on a fixed batch after a few Adam steps on one repeated random batch."""
    torch.manual_seed(0)
    m = LanguageModel(cfg(width, param, 32 if param == "mup" else None, vocab_size=128))
    opt = build_optimizer(m, SimpleNamespace(weight_decay=0.0, betas=[0.9, 0.98], eps=1e-8), 1e-2, torch.device("cpu"))
    x = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        opt.zero_grad()
        m.head_loss(m.hidden(x[:, :-1]), x[:, 1:], dispatch=False).backward()
        opt.step()
    with torch.no_grad():
        return m(x[:, :-1]).abs().mean().item()


def test_coordinate_check_logits_stay_put_under_mup_and_grow_under_sp():
    """Widths 32 -> 128 (base 32): the logits' size after training grows with the width in SP
    (Adam's updates to the tied embedding line up with h), and stays within 1.5x under muP."""
    sp = [_coords("standard", w) for w in (32, 128)]
    mu = [_coords("mup", w) for w in (32, 128)]
    assert mu[0] == pytest.approx(sp[0])  # the base width is SP
    assert 1 / 1.5 < mu[1] / mu[0] < 1.5
    assert sp[1] / sp[0] > 2.0


def test_mup_needs_a_base_width():
    with pytest.raises(ValueError, match="mup_base_width"):
        cfg(64, "mup", None)


def test_resume_under_mup_is_exact(lmtk_env):
    """muP at twice its base width: a run resumed from its mid-run checkpoint ends with the
    straight run's weights (the per-group lrs come back with the optimizer state)."""
    common = [*helpers.TINY, "budget.steps=4", "schedule=cosine", "model.parametrization=mup", "model.mup_base_width=16"]
    helpers.train(*common, "run.name=A", "checkpoint.every=2")
    helpers.train(*common, "run.name=B", f"resume={lmtk_env.runs / 'A' / 'checkpoints' / 'step-000002'}")
    wa, wb = (load_file(str(lmtk_env.runs / r / "checkpoints" / "final" / "model.safetensors")) for r in "AB")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
