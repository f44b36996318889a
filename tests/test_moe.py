"""Sparse mixture-of-experts MLP (model.mlp=moe, lmtk/models/moe.py) and the auxiliary losses
the training loop adds for it (lmtk/models/auxloss.py)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import helpers
from lmtk.errors import UserError
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.auxloss import collect
from lmtk.models.layers import MLP
from lmtk.models.moe import MoE, entropy_balance, moe_config, switch_balance, usage_entropy


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, positions="rope", norm="rmsnorm",
                       bias=False, mlp="moe", moe=moe, max_seq_len=64)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_one_expert_is_the_dense_mlp(router):
    torch.manual_seed(0)
    moe = MoE(32, 64, moe_config({"experts": 1, "top_k": 1, "router": router}), False, 0.0)
    dense = MLP(32, 64, "swiglu", False, 0.0)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 7, 32)
    if router == "softmax":  # the gate is softmax over one expert, 1: the router weight is irrelevant
        torch.nn.init.normal_(moe.router.weight, 0, 5.0)
        torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-6)
    else:  # MoEUT's gate is sigmoid(s): with one expert, the dense MLP scaled by it
        gate = torch.sigmoid(moe.router(x))
        torch.testing.assert_close(moe(x), gate * dense(x), rtol=1e-5, atol=1e-6)


def test_forward_is_eager_inside_compiled_code_once_an_moe_is_built():
    MoE(16, 32, {"experts": 2, "top_k": 1}, False, 0.0)
    assert getattr(MoE.forward, "_torchdynamo_disable", False)  # torch.compiler.disable's mark


def test_each_token_gets_its_top_k_experts_gated():
    """The gathered computation equals the definition y_t = sum_{e in topk} p_t[e] FFN_e(x_t)."""
    torch.manual_seed(1)
    moe = MoE(32, 64, moe_config({"experts": 4, "top_k": 2, "d_expert": 16, "router": "softmax"}), False, 0.0)
    x = torch.randn(2, 9, 32)
    p = torch.softmax(moe.router(x), -1)
    every = torch.stack([ffn(x) for ffn in moe.experts], -2)  # [B, T, E, d]
    gate, idx = p.topk(2, -1)
    want = (every.gather(-2, idx[..., None].expand(-1, -1, -1, 32)) * gate[..., None]).sum(-2)
    torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-6)


def test_routing_is_deterministic_under_a_seed():
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = LanguageModel(_cfg(experts=4, top_k=2))
        outs.append(model.hidden(idx))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(4)
    assert not torch.equal(LanguageModel(_cfg(experts=4, top_k=2)).hidden(idx), outs[0])


def test_balance_losses_on_a_hand_made_case():
    # 4 tokens, 2 experts: 3 assignments to expert 0, 1 to expert 1; mean probabilities (0.625, 0.375)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.2, 0.8]])
    counts = torch.tensor([3, 1])
    assert switch_balance(probs, counts).item() == pytest.approx(2 * (0.75 * 0.625 + 0.25 * 0.375))
    assert switch_balance(torch.full((4, 2), 0.5), torch.tensor([2, 2])).item() == pytest.approx(1.0)  # balanced: 1
    # entropy regularisation: -H of the mean softmax; logits log p give softmax p
    bal = entropy_balance(probs.log())
    assert bal.item() == pytest.approx(0.625 * math.log(0.625) + 0.375 * math.log(0.375), abs=1e-6)
    assert entropy_balance(torch.zeros(5, 4)).item() == pytest.approx(-math.log(4))  # uniform: -log E, the minimum
    assert usage_entropy([2, 2]) == 1.0 and usage_entropy([4, 0]) == 0.0


def test_flops_count_active_experts_only():
    dense = LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, positions="rope",
                                      norm="rmsnorm", bias=False, mlp="swiglu"))
    moe = LanguageModel(_cfg(experts=8, top_k=2))  # d_expert = 64 // 2: the dense MLP's active size
    expert = 3 * 32 * 32  # a SwiGLU expert of width 32: up (2 x 32 rows) and down
    router = 32 * 8
    assert moe.num_params() - dense.num_params() == 2 * (8 * expert - 3 * 32 * 64 + router)
    assert moe.num_params(active=True) - dense.num_params() == 2 * router  # 2 of 8 experts + the router
    assert moe.flops_per_token(16) - dense.flops_per_token(16) == 6 * 2 * router
    more = LanguageModel(_cfg(experts=16, top_k=2))  # more experts: more parameters, the same FLOPs but the router's
    assert more.flops_per_token(16) - moe.flops_per_token(16) == 6 * 2 * 32 * 8


def test_every_parameter_gets_a_gradient_and_the_balance_loss_reaches_the_router():
    """Experts with no tokens still run (on an empty slice), so DDP needs no find_unused_parameters;
    the balance term collected around the forward carries the router's gradient."""
    torch.manual_seed(0)
    model = LanguageModel(_cfg(experts=4, top_k=1, router="softmax"))
    with torch.no_grad():  # equal logits: top-1 takes expert 0 for every token, experts 1..3 get none
        for b in model.blocks:
            b.mlp.router.weight.zero_()
    idx = torch.randint(0, 64, (2, 16))
    with collect(model) as aux:
        h = model.hidden(idx)
    assert [m for n, m in aux.metrics().items() if n == "moe/usage"] == [0.0]
    (h.sum() * 0 + aux.total()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # E sum f P: P pulled from the crowded expert
    with torch.no_grad():  # validation, generation: nothing collected
        with collect(model) as aux:
            model.hidden(idx)
    assert not aux.terms


def test_bad_moe_knobs_are_one_line_errors():
    with pytest.raises(UserError, match="model.moe.top_k=3: between 1 and model.moe.experts=2"):
        _cfg(experts=2, top_k=3)
    with pytest.raises(UserError, match="unknown config key 'model.moe.expert'"):
        _cfg(expert=2)
    assert ModelConfig(vocab_size=64, mlp="swiglu", moe={"experts": 2}).moe is None  # read only for mlp=moe


MOE = [*helpers.TINY, "model.mlp=moe", "model.moe.experts=4", "model.moe.top_k=2", "model.moe.router=softmax", "logger.every=1",
       "schedule=cosine"]


def test_moe_run_logs_balance_resumes_exactly_and_decodes(lmtk_env):
    runs = lmtk_env.runs
    helpers.train(*MOE, "budget.steps=4", "run.name=A")
    helpers.train(*MOE, "budget.steps=4", "run.name=B", "checkpoint.every=2")
    helpers.train(*MOE, "budget.steps=4", "run.name=C", f"resume={runs / 'B' / 'checkpoints' / 'step-000002'}")
    wa, wc = (load_file(str(runs / r / "checkpoints" / "final" / "model.safetensors")) for r in "AC")
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
    rows = [m for m in helpers.metrics(runs / "A") if "loss" in m]
    assert all(0 < m["moe/usage"] <= 1 and m["moe/balance"] >= 1 for m in rows)  # Switch's loss: >= 1, 1 when balanced
    la = {m["step"]: m["loss"] for m in rows}
    assert {m["step"]: m["loss"] for m in helpers.metrics(runs / "C") if "loss" in m} == {3: la[3], 4: la[4]}

    from lmtk.checkpoint import load_pretrained

    model, _tok, _meta = load_pretrained(str(runs / "A"))[:3]
    model.eval()
    idx = torch.randint(5, 200, (1, 12))
    full = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :5], cache=cache)]
    steps += [model(idx[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)

    res = helpers.cli("export", "A", str(runs.parent / "hf"), "--root", str(runs))
    assert res.exit_code != 0 and "model.mlp=moe is a sparse mixture of experts" in f"{res.exception} {res.output}"


def test_activation_checkpointing_gives_the_same_gradients():
    """The recomputation in backward neither adds balance terms nor changes the gradients."""
    torch.manual_seed(0)
    model = LanguageModel(_cfg(experts=4, top_k=2, router="sigmoid")).train()
    idx = torch.randint(0, 64, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        with collect(model) as aux:
            loss = model.head_loss(model.hidden(idx)[:, :-1], idx[:, 1:])
        terms = len(aux.terms)
        (loss + aux.total()).backward()
        assert len(aux.terms) == terms == 4  # balance and usage of 2 layers, none added in backward
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
