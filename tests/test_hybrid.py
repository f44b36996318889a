"""Hybrid objectives (issue 4): AntLM phases and GPT-BERT masked next-token prediction."""

from __future__ import annotations

import json

import pytest
import torch

from lmtk.config import compose
from lmtk.models import ModelConfig, build_model
from lmtk.models.infer import causal_logprobs, fill_mask, generate, pseudo_log_likelihood
from lmtk.objectives import build_objective


V = 64


class FakeTok:
    vocab_size = V
    pad_id, unk_id, cls_id, eos_id, mask_id = range(5)
    special_ids = list(range(5))


def objective(recipe, *overrides):
    cfg = compose(recipe, ["budget.steps=24", *overrides])
    return build_objective(cfg.objective, FakeTok())


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, positions="rope"))


class Recorder(torch.nn.Module):
    """Wraps a model and records the attention mode of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.modes = model, []

    def hidden(self, idx, causal=True):
        self.modes.append(causal)
        return self.model.hidden(idx, causal)

    def logits(self, h):
        return self.model.logits(h)

    def head_loss(self, h, targets, **kw):
        return self.model.head_loss(h, targets, **kw)


def test_antlm_phase_boundaries_fall_on_the_schedule():
    obj = objective("antlm")  # phases clm:4, mlm:16, clm:4 over 24 steps
    names = [obj.phase(step / 24)[1] for step in range(24)]
    assert names == ["clm"] * 4 + ["mlm"] * 16 + ["clm"] * 4
    obj = objective("antlm", "objective.phases=[mlm:1,clm:3]")
    assert [obj.phase(s / 8)[1] for s in range(8)] == ["mlm"] * 2 + ["clm"] * 6


def test_antlm_switches_the_attention_mask_with_the_phase():
    obj = objective("antlm")
    rec = Recorder(tiny_model())
    batch = torch.randint(5, V, (2, 16))
    for frac, causal in ((0.0, True), (0.5, False), (0.99, True)):
        rec.modes.clear()
        _, metrics = obj.loss(rec, batch, torch.Generator().manual_seed(0), frac)
        assert rec.modes == [causal]
        assert metrics["phase"].endswith("clm" if causal else "mlm")


def test_gpt_bert_mixes_causal_and_masked_at_the_configured_ratio():
    for causal_w, masked_w in ((1, 15), (1, 1), (3, 1)):
        obj = objective("gpt-bert", f"objective.causal_weight={causal_w}", f"objective.masked_weight={masked_w}")
        picks = [obj.pick_causal(torch.Generator().manual_seed(s), "cpu") for s in range(4000)]
        share = sum(picks) / len(picks)
        assert abs(share - causal_w / (causal_w + masked_w)) < 0.025, (causal_w, masked_w, share)


def test_gpt_bert_masked_batches_predict_token_p_from_output_p_minus_1():
    obj = objective("gpt-bert")
    m = tiny_model()
    batch = torch.randint(5, V, (3, 20))
    nll, scored = obj.masked.nll(m, batch, torch.Generator().manual_seed(7), rate=0.3)
    x, pos = obj.masked.corrupt(batch, torch.Generator().manual_seed(7), rate=0.3, first=1)
    assert (pos >= 1).all() and pos.shape[1] == round(0.3 * 19)
    logits = m.logits(m.hidden(x, causal=False))
    manual = torch.stack([
        torch.nn.functional.cross_entropy(logits[b, pos[b] - 1], batch[b, pos[b]], reduction="none") for b in range(3)
    ]).reshape(-1)
    assert torch.allclose(nll.reshape(-1), manual, atol=1e-5)
    assert torch.equal(scored, pos)  # scored at the masked positions (predicted from p - 1)


def test_gpt_bert_mask_rate_decays_and_is_logged():
    obj = objective("gpt-bert")  # 0.30 -> 0.15
    assert obj.mask_rate(0.0) == pytest.approx(0.30)
    assert obj.mask_rate(0.5) == pytest.approx(0.225)
    assert obj.mask_rate(1.0) == pytest.approx(0.15)
    _, metrics = obj.loss(tiny_model(), torch.randint(5, V, (2, 16)), torch.Generator().manual_seed(1), 0.5)
    assert metrics["phase"] in ("causal", "masked") and metrics["mask_rate"] == pytest.approx(0.225)


def test_bad_phase_spec_is_a_clear_error():
    from lmtk.errors import UserError

    with pytest.raises(UserError, match="name:weight"):
        objective("antlm", "objective.phases=[clm4]")
    with pytest.raises(UserError, match="clm or mlm"):
        objective("antlm", "objective.phases=[xlm:2]")


TINY = [
    "data.max_chars=600000", "tokenizer.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
    "data.seq_len=64", "train.batch_size=16", "train.micro_batch_size=8", "val.tokens=4096", "budget.hours=null",
    "train.lr=3e-3", "logger.every=1", "schedule.warmup=0.1",
]


@pytest.mark.parametrize("recipe", ["antlm", "gpt-bert"])
def test_hybrid_runs_learn_both_ways_and_log_phases(recipe, tmp_path, monkeypatch):
    from lmtk.checkpoint import load_pretrained
    from lmtk.train.pretrain import run

    monkeypatch.setenv("LMTK_RUNS", str(tmp_path / "runs"))
    cfg = compose(recipe, TINY + ["budget.steps=48", f"run.name={recipe}"])
    summary = run(cfg, recipe, [])
    rows = [json.loads(l) for l in (tmp_path / "runs" / recipe / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r["step"] == 0 and "val/clm_loss" in r)
    for key in ("val/clm_loss", "val/mlm_loss"):
        assert summary[key] < start[key] - 0.5, (key, start[key], summary[key])
    phases = [r["phase"] for r in rows if "phase" in r]
    assert len(phases) == 48
    if recipe == "antlm":
        assert phases == ["0:clm"] * 8 + ["1:mlm"] * 32 + ["2:clm"] * 8
    else:
        assert set(phases) <= {"causal", "masked"} and phases.count("masked") > phases.count("causal")

    # usable as a causal LM and as a masked LM
    model, tok, meta = load_pretrained(recipe, root=tmp_path / "runs")
    shift = meta["objective"]["masked_shift"]
    text = "def __init__(self, name):\n        self.name = name\n        return None\n"
    ids = torch.tensor([tok.encode(text)])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    assert causal_logprobs(model, ids).sum() > causal_logprobs(model, shuffled).sum()
    if recipe == "gpt-bert":
        # AntLM's 32 masked steps at this size learn no context in the masked reading on the
        # de-duplicated corpus (PLL of text == of its shuffle, to 0.01 nats; at 120 steps the
        # margin is still noise); GPT-BERT's masked next-token shares the causal reading's shift.
        assert pseudo_log_likelihood(model, ids, tok.mask_id, shift)[0] > pseudo_log_likelihood(model, shuffled, tok.mask_id, shift)[0]
    check_fill_mask_and_greedy_generate(model, ids, tok.mask_id, shift)
    assert (fill_mask(model, ids.masked_fill(ids == ids[0, 5], tok.mask_id), tok.mask_id, shift) != tok.mask_id).all()


def check_fill_mask_and_greedy_generate(model, ids, mask_id, shift):
    """Content, not shapes: fill-mask keeps every unmasked token and puts at each masked
    position p the argmax of the bidirectional logits at p - shift (the objective's convention);
    greedy generation appends, step by step, the argmax of a full causal forward of what it has."""
    at = [3, 5, 9, 14]
    masked = ids.clone()
    masked[0, at] = mask_id
    filled = fill_mask(model, masked, mask_id, shift)
    keep = masked != mask_id
    assert torch.equal(filled[keep], ids[keep])
    with torch.no_grad():
        logits = model(masked, causal=False)
    want = logits[0, [p - shift for p in at]].argmax(-1)
    assert torch.equal(filled[0, at], want), (filled[0, at], want)

    out = generate(model, ids[:, :8], 5, temperature=0)
    assert out.shape == (1, 13) and torch.equal(out[:, :8], ids[:, :8])
    with torch.no_grad():
        for t in range(8, 13):
            assert out[0, t] == model(out[:, :t], causal=True)[0, -1].argmax(), t


def test_fill_mask_and_greedy_generate_content_on_an_untrained_model():
    """The same checks without a trained run, for both masked-prediction conventions (shift 0:
    BERT MLM, 1: GPT-BERT); a wrong shift picks the logits of the wrong position."""
    model = tiny_model(3).eval()
    ids = torch.randint(5, V, (1, 20), generator=torch.Generator().manual_seed(0))
    for shift in (0, 1):
        check_fill_mask_and_greedy_generate(model, ids, FakeTok.mask_id, shift)


def test_generate_and_fill_mask_commands(tmp_path, monkeypatch):
    import subprocess
    import sys

    from lmtk.train.pretrain import run

    monkeypatch.setenv("LMTK_RUNS", str(tmp_path / "runs"))
    run(compose("gpt-bert", TINY + ["budget.steps=4", "run.name=g"]), "gpt-bert", [])
    env = dict(__import__("os").environ, LMTK_RUNS=str(tmp_path / "runs"))
    base = [sys.executable, "-m", "lmtk", "generate", "g"]
    a = subprocess.run(base + ["-p", "def main(", "-n", "12", "--seed", "1"], env=env, capture_output=True, text=True)
    b = subprocess.run(base + ["-p", "def main(", "-n", "12", "--seed", "1"], env=env, capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("def main(") and len(a.stdout) > len("def main(") and a.stdout == b.stdout
    f = subprocess.run(base + ["--fill-mask", "-p", "import [MASK]"], env=env, capture_output=True, text=True)
    assert f.returncode == 0 and "[MASK]" not in f.stdout and f.stdout.startswith("import")
    # the masked convention travels in the checkpoint's metadata, not in the objective's name
    meta_path = tmp_path / "runs" / "g" / "checkpoints" / "final" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["objective"] == {"name": "gpt-bert", "masked_shift": 1}
    meta["objective"]["name"] = "my-own-objective"
    meta_path.write_text(json.dumps(meta))
    renamed = subprocess.run(base + ["--fill-mask", "-p", "import [MASK]"], env=env, capture_output=True, text=True)
    assert renamed.stdout == f.stdout
    meta_path.write_text(json.dumps(dict(meta, objective={"name": "gpt-bert", "masked_shift": 1})))
    # the commands print what the library computes: greedy continuation, fill-mask with GPT-BERT's shift
    from lmtk.checkpoint import load_pretrained

    model, tok, _ = load_pretrained("g", root=tmp_path / "runs")
    greedy = subprocess.run(base + ["-p", "def main(", "-n", "6", "--temperature", "0"], env=env, capture_output=True, text=True)
    ids = torch.tensor([tok.encode("def main(")])
    assert greedy.stdout.rstrip("\n") == tok.decode(generate(model, ids, 6, temperature=0)[0].tolist())
    ids = torch.tensor([tok.encode("import ") + [tok.mask_id]])
    assert f.stdout.rstrip("\n") == tok.decode(fill_mask(model, ids, tok.mask_id, shift=1)[0].tolist())
    bad = subprocess.run(base[:-1] + ["nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "error: no run named 'nope'" in bad.stderr
