"""lmtk search: the hidden-covariance score (Serianni & Kalita 2023), the grid, the command."""

from __future__ import annotations

import json
import math
import re

import helpers
import pytest
import torch

from lmtk.errors import UserError
from lmtk.search import (
    Axis,
    expand,
    hidden_covariance,
    kendall_tau,
    parse_grid,
    score_model,
)

SMALL = [*helpers.TINY, "search.batches=1"]


# ---- the score -------------------------------------------------------------------------------------


def test_score_is_highest_for_uncorrelated_units():
    """The paper's ordering: decorrelated hidden units score near the maximum -D; units that copy one
    another score far lower (their zero eigenvalues cost 1/k each); partial correlation in between."""
    g = torch.Generator().manual_seed(0)
    n, d = 8192, 16
    free = torch.randn(n, d, generator=g)
    mixed = free + 2 * torch.randn(n, 1, generator=g)  # every unit shares one component: correlated
    copies = free[:, :4].repeat(1, 4) + 1e-9 * torch.randn(n, d, generator=g)  # 4 distinct units, each 4 times
    s_free, s_mixed, s_copies = hidden_covariance(free), hidden_covariance(mixed), hidden_covariance(copies)
    assert -d * 1.01 < s_free <= -d  # -sum(log l + 1/l) <= -D, equal at R = I
    assert s_copies < s_mixed < s_free
    assert s_copies < -1e5  # 12 redundant directions at ~1/k each


def test_score_reads_correlation_not_scale():
    """R is a correlation matrix: rescaling or shifting units changes nothing; a constant unit is a
    zero eigenvalue (it adds nothing), not a NaN."""
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(2048, 8, generator=g) @ torch.randn(8, 8, generator=g)).double()
    scaled = h * torch.tensor([1e-3, 1, 10, 0.5, 3, 7, 1e2, 2], dtype=torch.float64) + 5.0
    assert hidden_covariance(scaled) == pytest.approx(hidden_covariance(h), rel=1e-9)
    dead = h.clone()
    dead[:, 3] = 0.7
    s = hidden_covariance(dead)
    assert math.isfinite(s) and s < hidden_covariance(h) - 0.9e5


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties in both (tau-b): 8 more concordant than discordant pairs, 1 pair tied in x, 2 in y (scipy: 0.592999...)
    assert kendall_tau([1, 2, 2, 3, 5, 4], [2, 2, 1, 3, 3, 6]) == pytest.approx(8 / (14 * 13) ** 0.5)
    assert kendall_tau([1], [2]) is None and kendall_tau([1, 1], [1, 2]) is None


def test_score_model_reports_per_unit_and_per_layer():
    from lmtk.models import ModelConfig, build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2))
    x = torch.randint(0, 64, (4, 32))
    r = score_model(m, [x, x.flip(0)])
    assert r["tokens"] == 256 and len(r["layers"]) == 2
    assert r["score"] == pytest.approx(r["score_sum"] / 32) and r["score"] <= -1


# ---- the grid --------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_in_order():
    slots, axes = parse_grid(["model.d_model=[64,128]", "train.lr=1e-3", "model/mixer=[attention,gla]",
                              "optim.betas=[0.9,0.95]", "model.layers=[[attention,gla],AR]"])
    assert [a.key for a in axes] == ["model.d_model", "model/mixer", "model.layers"]
    assert axes[2].values == ["[attention,gla]", "AR"]  # items as written, nested lists kept whole
    cands = expand(slots, axes)
    assert len(cands) == 8 and [c.index for c in cands] == list(range(1, 9))
    # the first axis varies slowest; shared overrides stay in place; a list-typed key's plain list is one value
    assert cands[0].overrides == ["model.d_model=64", "train.lr=1e-3", "model/mixer=attention", "optim.betas=[0.9,0.95]",
                                  "model.layers=[attention,gla]"]
    assert cands[1].label == "model.d_model=64 model/mixer=attention model.layers=AR"
    assert cands[-1].label == "model.d_model=128 model/mixer=gla model.layers=AR"
    assert len({tuple(c.overrides) for c in cands}) == 8


def test_grid_on_a_list_typed_key_is_a_list_of_lists():
    slots, axes = parse_grid(["optim.betas=[[0.9,0.95],[0.9,0.99]]", "model=[small-gpt,gpt2]", "tokenizer.vocab_size=[512,'1024']"])
    assert [(a.key, a.values) for a in axes] == [("optim.betas", ["[0.9,0.95]", "[0.9,0.99]"]), ("model", ["small-gpt", "gpt2"]),
                                               ("tokenizer.vocab_size", ["512", "'1024'"])]
    assert expand(slots, axes)[0].overrides == ["optim.betas=[0.9,0.95]", "model=small-gpt", "tokenizer.vocab_size=512"]


@pytest.mark.parametrize("overrides,needle", [
    (["model.d_model=[]"], "gives the grid no value"),
    (["search.batches=[1,2]"], "search.* sets the search itself"),
    (["run.name=[a,b]"], "run.* sets the search itself"),
    (["model.d_model=64,128"], "a grid's values go in brackets, model.d_model=[64,128]"),
])
def test_grid_refuses(overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_grid(overrides)


def test_axis_is_a_slot_object():
    slots, axes = parse_grid(["model.d_model=[32,64]"])
    assert isinstance(slots[0], Axis) and slots[0] is axes[0]


# ---- the command -----------------------------------------------------------------------------------


def test_search_ranks_candidates_and_writes_its_record(lmtk_env):
    res = helpers.ok("search", *SMALL, "model/mixer=[attention,gla]", "model.d_model=[32,30]", "model.n_heads=4", "run.name=s")
    rec = json.loads((lmtk_env.runs / "s" / "search.json").read_text())
    info = json.loads((lmtk_env.runs / "s" / "run.json").read_text())
    assert info["kind"] == "search" and info["status"] == "done" and info["summary"]["scored"] == 2
    rows = {r["candidate"]: r for r in rec["candidates"]}
    assert set(rows) == {"model/mixer=attention model.d_model=32", "model/mixer=attention model.d_model=30",
                         "model/mixer=gla model.d_model=32", "model/mixer=gla model.d_model=30"}
    bad = rows["model/mixer=gla model.d_model=30"]
    assert bad["error"] == "model.d_model=30 is not divisible by model.n_heads=4" and "score" not in bad  # the others still ran
    good = sorted((r for r in rec["candidates"] if "score" in r), key=lambda r: r["rank"])
    assert [r["rank"] for r in good] == [1, 2] and good[0]["score"] >= good[1]["score"]
    assert all(r["tokens"] == 8 * 32 and r["params"] > 0 and r["seconds"] < 30 for r in good)
    assert not any((lmtk_env.runs / f"s-{i}").exists() for i in range(1, 5))  # train_steps=0: nothing trained
    out = res.output
    assert "rank" in out and "model/mixer=gla model.d_model=32" in out and "is not divisible" in out
    assert helpers.cli("runs").exit_code == 0


def test_search_trains_the_top_candidates_as_ordinary_runs(lmtk_env):
    from lmtk.runs import RunDir

    helpers.ok("search", *SMALL, "model/mixer=[attention,gla]", "model.n_layers=[1,2]", "search.train_steps=2", "search.top=2",
               "run.name=t", "val.tokens=256", "val.at_start=false")
    rec = json.loads((lmtk_env.runs / "t" / "search.json").read_text())
    top = sorted((r for r in rec["candidates"] if "score" in r), key=lambda r: r["rank"])[:2]
    trained = [r for r in rec["candidates"] if r.get("run")]
    assert sorted(r["index"] for r in trained) == sorted(r["index"] for r in top)  # the two best-scored, no others
    for r in trained:
        run = RunDir(lmtk_env.runs / r["run"])
        info = run.info()
        assert r["run"] == f"t-{r['index']}" and info["kind"] == "train" and info["summary"]["steps"] == 2
        assert info["parents"]["search"] == str(lmtk_env.runs / "t")
        assert r["val_loss"] == info["summary"]["val/loss"]
    assert rec["kendall_tau"] in (-1.0, 1.0) and rec["trained"] == 2
    assert json.loads((lmtk_env.runs / "t" / "run.json").read_text())["summary"]["kendall_tau"] == rec["kendall_tau"]


def test_a_candidate_that_fails_to_train_leaves_the_others_to_train(lmtk_env, monkeypatch):
    """A diverged candidate (any UserError from its training run) is that row's note; the rest
    train and the tau is over those that did."""
    from lmtk.train import pretrain
    from lmtk.train.loop import Diverged

    real = pretrain.run

    def run(cfg, *a, **kw):
        if cfg.model.n_layers == 1 and cfg.model.mixer.name == "gla":
            raise Diverged("loss was not finite for 3 steps in a row at step 2; lower train.lr")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(pretrain, "run", run)
    res = helpers.ok("search", *SMALL, "model/mixer=[attention,gla]", "model.n_layers=[1,2]", "search.train_steps=2",
                     "run.name=f", "val.tokens=256", "val.at_start=false")
    rec = json.loads((lmtk_env.runs / "f" / "search.json").read_text())
    rows = {r["candidate"]: r for r in rec["candidates"]}
    bad = rows["model/mixer=gla model.n_layers=1"]
    assert bad["error"].startswith("training: loss was not finite") and bad.get("val_loss") is None
    assert rec["trained"] == 3 and all(r.get("val_loss") is not None for k, r in rows.items() if r is not bad)
    assert "training: loss was not finite" in res.output
    assert json.loads((lmtk_env.runs / "f" / "run.json").read_text())["status"] == "done"
