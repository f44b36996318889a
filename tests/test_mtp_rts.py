"""objective=mtp (multi-token prediction) and objective=rts (random token substitution): their
defining properties, their own heads (attached to the model, checkpointed, restored on resume,
dropped for inference and export), and that both learn on real text."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import helpers
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmtk.models import ModelConfig, build_model
from lmtk.objectives import CLM, build_objective
from lmtk.objectives.mtp import MTP
from lmtk.objectives.rts import RTS

V = 200
N_SPECIAL = 5
TOK = SimpleNamespace(vocab_size=V, mask_id=4, special_ids=list(range(N_SPECIAL)))


def mcfg(name="mtp", k=3, weights=(), rate=0.15, lm_weight=0.0):
    return SimpleNamespace(name=name, mtp_k=k, mtp_weights=list(weights), replace_rate=rate, lm_weight=lm_weight,
                           mask_rate=0.15, mask_token_frac=0.8, random_token_frac=0.1)


def model(vocab=V):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


def batch(B=4, L=32, seed=0, low=N_SPECIAL, vocab=V):
    return torch.randint(low, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


# ---- mtp -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_mtp_with_k1_is_clm_exactly(fused):
    m, x = model(), batch()
    clm, mtp = CLM(mcfg("clm"), TOK), MTP(mcfg(k=1), TOK)
    clm.fused_head = mtp.fused_head = mtp.clm.fused_head = fused
    mtp.attach(m)
    assert len(m.objective_heads) == 0  # k=1: no extra head, nothing added to the model
    a, _ = clm.loss(m, x, None)
    a.backward()
    ga = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    b, metrics = mtp.loss(m, x, None)
    b.backward()
    assert torch.equal(a, b) and metrics == {}
    assert all(torch.equal(ga[n], p.grad) for n, p in m.named_parameters())


def test_mtp_head_j_predicts_the_token_j_ahead():
    """A hand-made window: head j (1 = the model's own) is scored, from outputs 0..L-1-j, on the tokens
    j ahead; the loss is the weighted mean of the heads' cross-entropies."""
    m = model()
    mtp = MTP(mcfg(k=3, weights=[2, 1, 1]), TOK)
    mtp.attach(m)
    x = torch.tensor([[10, 11, 12, 13, 14, 15]])
    calls = []
    real = m.head_loss

    def spy(h, targets, **kw):
        calls.append((h.detach().clone(), targets.clone()))
        return real(h, targets, **kw)

    m.head_loss = spy
    loss, metrics = mtp.loss(m, x, None)
    assert [t.tolist() for _, t in calls] == [[[11, 12, 13, 14, 15]], [[12, 13, 14, 15]], [[13, 14, 15]]]
    with torch.no_grad():
        h = m.hidden(x)
        heads = m.objective_heads["mtp"]
        inputs = [h[:, :5], heads[0](h[:, :4]), heads[1](h[:, :3])]
        for j, (hj, (seen, _)) in enumerate(zip(inputs, calls), start=1):
            assert torch.allclose(seen, hj)  # the main head reads the trunk itself, head j its own block's output
            ce = F.cross_entropy(m.logits(hj)[0], x[0, j:])
            assert math.isclose(metrics[f"mtp/loss_{j}"].item(), ce.item(), rel_tol=1e-5)
    want = (2 * metrics["mtp/loss_1"] + metrics["mtp/loss_2"] + metrics["mtp/loss_3"]) / 4
    assert torch.allclose(loss, want)
    # validation reads the main head alone: predict() is CLM's next-token reading
    hp, pos = mtp.predict(m, x, None)
    assert pos.tolist() == [[1, 2, 3, 4, 5]] and torch.allclose(hp, m.hidden(x)[:, :5])


def test_mtp_heads_are_model_parameters_and_counted_in_flops():
    m = model()
    base = m.flops_per_token(32, 1.0)
    mtp = MTP(mcfg(k=4), TOK)
    mtp.attach(m)
    heads = m.objective_heads["mtp"]
    assert len(heads) == 3
    n_heads = sum(p.numel() for p in heads.parameters())
    names = {n for n, _ in m.named_parameters()}
    assert {f"objective_heads.mtp.{i}.mlp.up.weight" for i in range(3)} <= names  # optimized and saved with the model
    # the extra heads' MLPs (6 x parameters per token) and three more passes through the unembedding
    assert m.flops_per_token(32, mtp.head_fraction) - base == 6 * n_heads + 6 * 3 * V * 32
    assert m.logits(m.hidden(batch()[:, :8])).shape[-1] == V  # generation's path: the model's own head


# ---- rts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,L", [(0.15, 32), (0.3, 40), (0.5, 16)])
def test_rts_replaces_exactly_the_labelled_positions(rate, L):
    rts = RTS(mcfg("rts", rate=rate), TOK)
    x0 = batch(B=16, L=L, seed=1, low=0)  # specials among the originals too
    x, pos, labels = rts.corrupt(x0, torch.Generator().manual_seed(2))
    k = round(rate * L)
    assert pos.shape == (16, k) and labels.sum(1).tolist() == [k] * 16
    # a token "replaced" by itself never happens: changed positions are exactly those labelled 1
    assert torch.equal(x != x0, labels.bool())
    assert bool((x.gather(1, pos) >= N_SPECIAL).all())  # replacements are never special tokens
    assert x0.equal(batch(B=16, L=L, seed=1, low=0)), "corrupt must not modify its input in place"
    # seeded: the same generator state gives the same corruption
    assert torch.equal(rts.corrupt(x0, torch.Generator().manual_seed(2))[0], x)


def test_rts_replacement_is_uniform_over_the_other_tokens():
    """Vocabulary 8 with specials 0-4: a 6 becomes a 5 or a 7 (never itself), about half each; a special
    becomes any of 5, 6, 7."""
    tok = SimpleNamespace(vocab_size=8, mask_id=4, special_ids=list(range(5)))
    rts = RTS(mcfg("rts", rate=0.5), tok)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((2000, 8), 6)
    x0[:, 4:] = 3  # the second half: a special token
    x, _, labels = rts.corrupt(x0, gen)
    regular, special = x[:, :4][labels[:, :4].bool()], x[:, 4:][labels[:, 4:].bool()]
    assert set(regular.tolist()) == {5, 7} and abs((regular == 5).float().mean().item() - 0.5) < 0.05
    assert set(special.tolist()) == {5, 6, 7}
    assert all(abs((special == t).float().mean().item() - 1 / 3) < 0.05 for t in (5, 6, 7))


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_rts_loss_is_bce_over_all_tokens_plus_the_swapped_token_lm_loss(lm_weight):
    m = model()
    rts = RTS(mcfg("rts", rate=0.25, lm_weight=lm_weight), TOK)
    rts.attach(m)
    x0 = batch()
    loss, metrics = rts.loss(m, x0, torch.Generator().manual_seed(3))
    x, pos, labels = rts.corrupt(x0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = m.hidden(x, causal=False)
        logit = m.objective_heads["rts"](h)
        bce = F.binary_cross_entropy_with_logits(logit, labels)
        want = bce
        if lm_weight:
            hp = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
            want = bce + lm_weight * F.cross_entropy(m.logits(hp).reshape(-1, V), x0.gather(1, pos).reshape(-1))
    assert torch.allclose(loss, want, atol=1e-5)
    assert math.isclose(metrics["rts/accuracy"].item(), ((logit > 0) == labels.bool()).float().mean().item())
    assert ("rts/lm_loss" in metrics) == bool(lm_weight)
    assert rts.head_fraction == (0.25 if lm_weight else 0.0) and rts.val_key == "mlm" and rts.bidirectional


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_rts_every_trainable_parameter_gets_a_gradient(tied, lm_weight):
    """Without the LM loss an untied decoder would get no gradient (DDP then hangs on it): it is
    frozen; a tied one is the input embedding and trains; with the LM loss the head trains."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, tie_embeddings=tied))
    rts = RTS(mcfg("rts", lm_weight=lm_weight), TOK)
    rts.attach(m)
    rts.loss(m, batch(), torch.Generator().manual_seed(3))[0].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert m.embed.weight.requires_grad and m.head.weight.requires_grad == (tied or lm_weight > 0)


def test_build_objective_knows_mtp_and_rts():
    assert isinstance(build_objective(mcfg("mtp"), TOK), MTP)
    assert isinstance(build_objective(mcfg("rts"), TOK), RTS)


# ---- end to end: learning on real text, resume, inference without the heads --------------------

RUN = [*helpers.TINY, "budget.steps=30", "train.lr=3e-3", "logger.every=5", "val.every=0"]


def _train_loss(run, key="loss"):
    rows = [m for m in helpers.metrics(run) if key in m]
    return rows[0][key], rows[-1][key]


def test_mtp_and_rts_learn_on_real_text(lmtk_env):
    helpers.train(*RUN, "objective=mtp", "objective.mtp_k=3", "run.name=mtp")
    helpers.train(*RUN, "objective=rts", "objective.lm_weight=1", "run.name=rts")
    for j in (1, 2, 3):
        first, last = _train_loss(lmtk_env.runs / "mtp", f"mtp/loss_{j}")
        assert last < first - 0.5, (j, first, last)
    first, last = _train_loss(lmtk_env.runs / "rts", "rts/bce")
    assert last < first - 0.1
    first, last = _train_loss(lmtk_env.runs / "rts", "rts/lm_loss")
    assert last < first - 0.2
    s = helpers.info(lmtk_env.runs / "mtp")["summary"]
    assert "val/clm_loss" in s and s["val/loss"] == s["val/clm_loss"]  # the standard causal validation
    s = helpers.info(lmtk_env.runs / "rts")["summary"]
    assert "val/mlm_loss" in s and s["val/loss"] == s["val/mlm_loss"]  # the standard masked validation


def test_mtp_resume_is_exact_and_inference_drops_the_heads(lmtk_env, tmp_path):
    from lmtk.checkpoint import load_pretrained
    from lmtk.models.hf_export import export_hf

    runs, n = lmtk_env.runs, 4
    common = [*helpers.TINY, f"budget.steps={2 * n}", "logger.every=1", "objective=mtp", "objective.mtp_k=3"]
    helpers.train(*common, "run.name=A")
    helpers.train(*common, "run.name=B", f"checkpoint.every={n}")
    ckpt = runs / "B" / "checkpoints" / f"step-{n:06d}"
    assert any(k.startswith("objective_heads.mtp.1.") for k in load_file(str(ckpt / "model.safetensors")))
    # crash after step n: drop what came later, continue
    shutil.rmtree(runs / "B" / "checkpoints" / "final")
    info = helpers.info(runs / "B")
    info["status"] = "running"
    (runs / "B" / "run.json").write_text(json.dumps(info))
    helpers.train(*common, "run.name=B", f"checkpoint.every={n}", "resume=auto")
    wa, wb = (load_file(str(runs / r / "checkpoints" / "final" / "model.safetensors")) for r in "AB")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # the heads included
    la, lb = ({m["step"]: m["loss"] for m in helpers.metrics(runs / r) if "loss" in m} for r in "AB")
    assert lb == la
    # inference: the model's own head alone; eval, generate and export load the checkpoint without the heads
    lm, _, meta = load_pretrained(runs / "A")
    assert len(lm.objective_heads) == 0 and meta["objective"]["name"] == "mtp"
    out = tmp_path / "hf"
    export_hf(str(runs / "A"), out)
    assert not any(k.startswith("objective_heads") for k in load_file(str(out / "model.safetensors")))
    # a new run from this checkpoint must keep its objective's heads
    with pytest.raises(Exception, match="differ in their training heads"):
        helpers.train(*common[:-2], "run.name=C", f"resume={ckpt}")
