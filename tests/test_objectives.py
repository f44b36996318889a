"""CLM and MLM objectives: masking counts, the 80/10/10 split, which positions carry loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmtk.models import ModelConfig, build_model
from lmtk.objectives import CLM, MLM, build_objective
from lmtk.errors import UserError

V = 200
N_SPECIAL = 5
MASK = 4
TOK = SimpleNamespace(vocab_size=V, mask_id=MASK, special_ids=list(range(N_SPECIAL)))


def ocfg(name="mlm", rate=0.15, mask_frac=0.8, rand_frac=0.1):
    return SimpleNamespace(name=name, mask_rate=rate, mask_token_frac=mask_frac, random_token_frac=rand_frac)


def model(vocab=V):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_seq_len=128)).eval()


def batch(B=8, L=64, seed=0):
    # no special tokens in the input, so [MASK] in the corrupted input can only come from masking
    return torch.randint(N_SPECIAL, V, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate,L", [(0.15, 64), (0.15, 128), (0.3, 40), (0.4, 32)])
def test_mlm_masks_exactly_round_rate_times_L_per_row(rate, L):
    obj = MLM(ocfg(rate=rate), TOK)
    x0 = batch(L=L)
    x, pos = obj.corrupt(x0, torch.Generator().manual_seed(1))
    k = round(rate * L)
    assert pos.shape == (x0.shape[0], k)
    for r in range(x0.shape[0]):
        assert len(set(pos[r].tolist())) == k  # distinct positions
        # outside the selected positions the input is untouched
        outside = torch.ones(L, dtype=torch.bool)
        outside[pos[r]] = False
        assert torch.equal(x[r, outside], x0[r, outside])
    assert not torch.equal(x, x0)
    assert x0.equal(batch(L=L)), "corrupt must not modify its input in place"


@pytest.mark.parametrize("rate,L", [(0.15, 64), (0.15, 128), (0.5, 40)])
def test_mlm_80_10_10_split(rate, L):
    obj = MLM(ocfg(rate=rate), TOK)
    x0 = batch(B=16, L=L, seed=2)
    x, pos = obj.corrupt(x0, torch.Generator().manual_seed(3))
    k = round(rate * L)
    n_mask, n_rand = round(0.8 * k), round(0.1 * k)
    sel_x, sel_0 = x.gather(1, pos), x0.gather(1, pos)
    # the first 80% of the selected positions are [MASK]
    assert (sel_x[:, :n_mask] == MASK).all()
    # the next 10% are random non-special tokens
    rand = sel_x[:, n_mask : n_mask + n_rand]
    assert ((rand >= N_SPECIAL) & (rand < V)).all()
    # the rest keep their token
    assert torch.equal(sel_x[:, n_mask + n_rand :], sel_0[:, n_mask + n_rand :])
    # counted over the whole row: exactly n_mask [MASK] tokens per row
    assert ((x == MASK).sum(dim=1) == n_mask).all()
    # random replacements mostly differ from the original (1/195 chance each to coincide)
    if n_rand:
        assert (rand != sel_0[:, n_mask : n_mask + n_rand]).float().mean() > 0.8


def test_mlm_corruption_is_seeded():
    obj = MLM(ocfg(), TOK)
    x0 = batch()
    a = obj.corrupt(x0, torch.Generator().manual_seed(5))
    b = obj.corrupt(x0, torch.Generator().manual_seed(5))
    c = obj.corrupt(x0, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mlm_loss_only_on_masked_positions():
    obj = MLM(ocfg(), TOK)
    m = model()
    x0 = batch(B=4, L=64)
    nll, pos_scored = obj.nll(m, x0, torch.Generator().manual_seed(7))
    k = round(0.15 * 64)
    assert nll.shape == (4, k) and pos_scored.shape == (4, k)
    nll, targets = nll.reshape(-1), x0.gather(1, pos_scored).reshape(-1)
    # recompute by hand: bidirectional logits on the corrupted input, at the selected positions
    x, pos = obj.corrupt(x0, torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = m(x, causal=False)
    sel = logits.gather(1, pos[..., None].expand(-1, -1, V))
    manual = F.cross_entropy(sel.reshape(-1, V), x0.gather(1, pos).reshape(-1), reduction="none")
    torch.testing.assert_close(nll, manual, rtol=1e-5, atol=1e-5)
    assert torch.equal(pos_scored, pos)  # the scored positions are the masked ones
    # and the loss is their mean
    loss, _ = obj.loss(m, x0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss, manual.mean(), rtol=1e-5, atol=1e-5)


def test_clm_loss_equals_manual_cross_entropy():
    obj = CLM(ocfg("clm"), TOK)
    m = model()
    x = batch(B=3, L=20)
    loss, metrics = obj.loss(m, x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(x, causal=True)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    nll, pos = obj.nll(m, x, torch.Generator())
    assert nll.shape == (3, 19) and torch.equal(pos, torch.arange(1, 20).expand(3, -1))  # targets 1..L-1
    torch.testing.assert_close(nll.mean(), manual, rtol=1e-5, atol=1e-6)
    assert isinstance(metrics, dict)


def test_clm_ignores_randomness():
    obj = CLM(ocfg("clm"), TOK)
    m = model()
    x = batch(B=2, L=16)
    a, _ = obj.loss(m, x, torch.Generator().manual_seed(1))
    b, _ = obj.loss(m, x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_build_objective():
    assert isinstance(build_objective(ocfg("clm"), TOK), CLM)
    assert isinstance(build_objective(ocfg("mlm"), TOK), MLM)
    with pytest.raises(UserError, match="unknown objective"):
        build_objective(ocfg("xlm"), TOK)


@pytest.mark.parametrize("name", ["clm", "mlm", "mntp"])
def test_lm_metrics_bpb_divides_by_the_bytes_at_the_scored_positions(name):
    """bits-per-byte charges each scored target the bytes stored beside it in the val stream
    (Batches.ordered), at the positions the objective scored: CLM 1..L-1, MLM the masked
    positions, GPT-BERT's masked next-token the masked positions."""
    import math

    import numpy as np

    from lmtk.data.packing import Batches
    from lmtk.eval.lm import lm_metrics
    from lmtk.objectives.hybrid import MaskedNextToken

    cfg = ocfg(name if name != "mntp" else "mlm")
    obj = {"clm": CLM, "mlm": MLM, "mntp": MaskedNextToken}[name](cfg, TOK)
    m = model()
    L, n_win = 16, 6
    tokens = np.random.default_rng(0).integers(N_SPECIAL, V, L * n_win).astype(np.uint16)
    nbytes = np.random.default_rng(1).integers(0, 9, L * n_win).astype(np.uint32)  # bytes differ token by token
    data = Batches(tokens, L, seed=0, nbytes=nbytes)
    out = lm_metrics(m, {name: obj}, data, tokens=L * n_win, batch_size=4, device=torch.device("cpu"), dtype=torch.float32, seed=3)
    # by hand: the same batches and masking, bytes gathered at the scored positions
    gen = torch.Generator().manual_seed(3)
    nats = charged = 0.0
    windows = torch.from_numpy(tokens.astype(np.int64)).reshape(n_win, L)
    wbytes = torch.from_numpy(nbytes.astype(np.int64)).reshape(n_win, L)
    for s in range(0, n_win, 4):
        with torch.no_grad():
            nll, pos = obj.nll(m, windows[s : s + 4], gen)
        nats += nll.double().sum().item()
        charged += wbytes[s : s + 4].gather(1, pos).sum().item()
    assert charged != wbytes.sum().item()  # not all bytes: only the scored positions'
    assert out[f"{name}_bpb"] == pytest.approx(nats / math.log(2) / charged, rel=1e-9)
    # and the ordered stream carries the bytes beside the ids
    (ids, b), *_ = data.ordered(L * n_win, 2)
    assert torch.equal(ids, windows[:2]) and torch.equal(b, wbytes[:2])


def test_val_mask_rate_and_seed_are_config_keys(lmtk_env):
    """val.mask_rate and val.seed set validation's masked reading; the defaults (0.15, null ->
    seed + 12345) give the numbers the hard-coded values gave."""
    import helpers
    from lmtk.config import compose

    cfg = compose("default", ["budget.steps=1"])
    assert cfg.val.mask_rate == 0.15 and cfg.val.seed is None
    for bad in ("0", "1", "1.5"):
        with pytest.raises(UserError, match="val.mask_rate"):
            compose("default", ["budget.steps=1", f"val.mask_rate={bad}"])

    def val_mlm(name, *over):
        helpers.train(*helpers.TINY, "budget.steps=1", "val.at_start=false", "seed=3", f"run.name={name}", *over)
        return helpers.info(lmtk_env.runs / name)["summary"]

    default = val_mlm("default")
    same = val_mlm("same", "val.seed=12348", "val.mask_rate=0.15")  # what seed=3 meant before: 3 + 12345
    other_seed = val_mlm("seed", "val.seed=1")
    other_rate = val_mlm("rate", "val.mask_rate=0.4")
    assert same["val/mlm_loss"] == default["val/mlm_loss"] and same["val/mlm_bpb"] == default["val/mlm_bpb"]
    assert other_seed["val/mlm_loss"] != default["val/mlm_loss"]
    assert other_rate["val/mlm_loss"] != default["val/mlm_loss"]
    assert other_seed["val/clm_loss"] == other_rate["val/clm_loss"] == default["val/clm_loss"]  # causal: no masking
