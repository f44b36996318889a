"""PEFT inside the model (lmtk/peft): LoRA / DoRA start as exact no-ops and leave base weights
bit-identical, merge equals unmerged, adapters reload onto a fresh base (and refuse another),
BitFit trains biases only; parameter groups by name keep pretraining's; task metrics; special
token ids read from the tokenizer; micro-batches weighted by their counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmtk import peft
from lmtk.errors import UserError
from lmtk.finetune.model import TaskModel, build_task_model
from lmtk.models import LanguageModel, ModelConfig

PEFT = {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["*mixer.*"], "rslora": False, "dora": False,
        "bias": "none", "biases": ["*"], "add_biases": True}


def _cfg(**kw):
    return OmegaConf.create({**PEFT, **kw})


def tiny(bias=False, mixer="attention", seed=0):
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, positions="rope",
                                     rope_layout="half", norm="rmsnorm", mlp="swiglu", bias=bias, mixer={"name": mixer}))


def _batch(seed=1, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    return ids, mask


def _train(model, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids, mask = _batch()
    for _ in range(steps):
        out = model(ids, attention_mask=mask) if isinstance(model, TaskModel) else model(ids)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_is_exact_noop_at_start_keeps_base_and_merges(dora, rslora):
    model = tiny()
    ids, _ = _batch()
    with torch.no_grad():
        before = model(ids)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    info = peft.apply(model, _cfg(dora=dora, rslora=rslora))
    assert len(info["adapted"]) == 4  # qkv and out of 2 layers
    # the base state dict loads into the adapted model unchanged: same names, only adapter tensors added
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "magnitude") for k in missing)
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0 (and m / ||W|| = 1): exactly the base
    scale = 8.0 / math.sqrt(4) if rslora else 8.0 / 4
    assert all(m.scale == scale for m in model.modules() if isinstance(m, peft.LoRALinear))
    _train(model)
    for k, v in base_state.items():
        assert torch.equal(model.state_dict()[k], v), f"base tensor {k} changed"
    assert any(m.lora_b.abs().sum() > 0 for m in model.modules() if isinstance(m, peft.LoRALinear))
    with torch.no_grad():
        unmerged = model(ids)
        assert not torch.allclose(unmerged, before, atol=1e-4)  # it learned something
        peft.merge(model)
        assert not any(isinstance(m, peft.LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(base_state)  # merged: the base's layout again


def test_bitfit_trains_biases_only_and_adds_zero_biases_to_a_biasless_base():
    model = tiny(bias=False)
    ids, mask = _batch()
    with torch.no_grad():
        before = model(ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    info = peft.apply(model, _cfg(method="bitfit"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    assert sorted(info["added_biases"]) == sorted(linears + ["head"])  # LM mode: the LM head too
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-6, rtol=0)  # zero biases change nothing
    _train(model)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), f"non-bias weight {k} changed"
    assert any(model.get_submodule(n).bias.abs().sum() > 0 for n in linears)
    assert all(p.requires_grad == (n.endswith(".bias")) for n, p in model.named_parameters())


def test_bitfit_bias_selection_by_name():
    model = tiny(bias=True)
    peft.apply(model, _cfg(method="bitfit", biases=["*mlp*"]))
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train and all(".mlp." in n and n.endswith("bias") for n in train)
    with pytest.raises(UserError, match="matches no bias"):
        peft.apply(tiny(bias=True), _cfg(method="bitfit", biases=["nothing*"], add_biases=False))


def test_trainable_fractions():
    d, r, L = 32, 4, 2
    model = TaskModel(tiny(), num_outputs=3, causal=True)
    total_base = sum(p.numel() for p in model.parameters())
    head = d * 3 + 3  # causal: last token -> output layer, no dense
    peft.apply(model, _cfg(), skip=("lm.head",))
    trainable, total = peft.count(model)
    qkv_out = 3 * d  # attention: qkv is d -> 3d, out d -> d
    lora = L * (r * (d + qkv_out) + r * (d + d))
    assert trainable == lora + head
    assert total == total_base + lora
    line = peft.describe(model, {"method": "lora", "adapted": ["x"]})
    assert f"{trainable:,} of {total:,}" in line and f"{100 * trainable / total:.2f}%" in line

    enc = TaskModel(tiny(bias=True), num_outputs=2, causal=False)
    peft.apply(enc, _cfg(method="bitfit"), skip=("lm.head",))
    biases = sum(p.numel() for n, p in enc.lm.named_parameters() if n.endswith("bias"))
    assert peft.count(enc)[0] == biases + (d * d + d) + (d * 2 + 2)  # encoder head: tanh dense + output

    full = TaskModel(tiny(), 2, causal=True)
    peft.apply(full, _cfg(method="full"))
    assert peft.count(full)[0] == peft.count(full)[1]


def test_lora_targets_matching_nothing_is_one_line():
    with pytest.raises(UserError) as e:
        peft.apply(tiny(), _cfg(targets=["*attn.q_proj"]))
    msg = str(e.value)
    assert "match no linear layer" in msg and "blocks.N.mixer.qkv" in msg and "\n" not in msg


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_adapter_save_load_on_fresh_base_reproduces_outputs(tmp_path, method):
    base = tiny(bias=False, seed=3)
    fp = peft.fingerprint(base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = TaskModel(base, 2, causal=True)
    cfg = _cfg(method=method, dora=True)
    peft.apply(model, cfg, skip=("lm.head",))
    _train(model)
    model.eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
    meta = {"peft": OmegaConf.to_container(cfg), "head": model.head_meta(), "skip": ["lm.head"],
            "base": {"path": "tiny", "fingerprint": fp, "model": base.cfg.to_dict()}}
    peft.save_adapter(model, tmp_path, meta)
    assert (tmp_path / "adapter.safetensors").stat().st_size < 0.5 * sum(v.numel() * 4 for v in base_state.values())

    fresh = tiny(bias=False, seed=99)
    fresh.load_state_dict(base_state)
    loaded = peft.load_adapter(fresh, tmp_path, build_head=build_task_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask), want, atol=1e-6, rtol=0)

    with pytest.raises(UserError, match="trained on another base"):
        peft.load_adapter(tiny(bias=False, seed=5), tmp_path, build_head=build_task_model)


# ---- parameter groups ------------------------------------------------------------------------


MIXERS = ["attention", "linear", "retnet", "gla", "hgrn2", "metala", "mamba2", "mlstm", "gdn"]


@pytest.mark.parametrize("mixer", MIXERS)
def test_decay_by_name_equals_pretrainings_rank_rule(mixer):
    """Pretraining keeps its behaviour: every parameter the old rule (decay matrices that are not
    embeddings) decayed is decayed by the name rule, and no other."""
    from lmtk.train.optim import param_groups

    cfg = OmegaConf.create({"weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8})
    for bias in (True, False):
        for positions, embedding_norm in (("learned", True), ("sinusoidal", False), ("rope", False)):
            torch.manual_seed(0)
            m = LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, positions=positions, bias=bias,
                                          embedding_norm=embedding_norm, norm="layernorm", mixer={"name": mixer}))
            emb = {id(x.weight) for x in m.modules() if isinstance(x, torch.nn.Embedding)}
            old = [p for p in m.parameters() if p.ndim >= 2 and id(p) not in emb]
            groups = param_groups(m, cfg)
            assert len(groups) == 2
            assert [id(p) for p in groups[0]["params"]] == [id(p) for p in old]
            assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(m.parameters()))


def test_groups_for_a_task_model_head_lr_and_lora_names():
    from lmtk.train.optim import build_optimizer, set_lr

    model = TaskModel(tiny(), 2, causal=False)
    peft.apply(model, _cfg(dora=True), skip=("lm.head",))
    cfg = OmegaConf.create({"weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "head_lr_scale": 10.0})
    opt = build_optimizer(model, cfg, 1e-3, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    decay, no_decay, head_decay, head_no_decay = groups
    assert all(n.endswith(("lora_a", "lora_b")) for n in decay) and decay
    assert all(n.endswith("magnitude") for n in no_decay) and no_decay
    assert sorted(head_decay) == ["classifier.dense.weight", "classifier.out.weight"]
    assert sorted(head_no_decay) == ["classifier.dense.bias", "classifier.out.bias"]
    set_lr(opt, 2e-4)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-4, 2e-3, 2e-3]


# ---- the loop weights micro-batches by count ---------------------------------------------------


def test_micro_batches_weighted_by_count_not_mean_of_means():
    """Two micro-batches of 1 and 5 examples: the step's gradient and loss are those of the mean
    over the 6 examples (a mean of the two means would weigh the lone example 5x)."""
    from types import SimpleNamespace

    from lmtk.dist import Dist
    from lmtk.train.budget import TrainState
    from lmtk.train.loop import _StepModel, _forward_backward

    xs = [torch.tensor([3.0]), torch.tensor([1.0, 2.0, -1.0, 0.5, 4.0])]

    class Data:
        n = 2

        def get(self, start, count, pin=False):
            return {"input_ids": xs[start % 2], "x": xs[start % 2], "labels": xs[start % 2]}

    class Obj:
        name, head_fraction = "t", 0.0

        def loss(self, model, batch, gen, frac):
            return (model.model.w * batch["x"]).pow(2).mean(), {}

        @staticmethod
        def count(batch):
            return len(batch["x"])

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor(0.7))
    cfg = OmegaConf.create({"seed": 0, "train": {"micro_batch_size": 1}})
    job = SimpleNamespace(cfg=cfg, train_data=Data(), objective=Obj(), device=torch.device("cpu"), dtype=torch.float32, scaler=None)
    state = TrainState()
    loss, _, _ = _forward_backward(job, _StepModel(model), state, 2, 0.0, Dist())
    allx = torch.cat(xs)
    w = torch.tensor(0.7, requires_grad=True)
    want = (w * allx).pow(2).mean()
    want.backward()
    assert math.isclose(float(loss), float(want.detach()), rel_tol=1e-6)
    assert math.isclose(float(model.w.grad), float(w.grad), rel_tol=1e-6)
    assert state.samples == 2


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    from lmtk.finetune import metrics as M

    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    assert M.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert M.f1(pred, gold) == pytest.approx(2 * 2 / (3 + 3))  # tp 2, 3 predicted, 3 true
    tp, tn, fp, fn = 2, 2, 1, 1
    assert M.matthews(pred, gold) == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert M.matthews([0, 0, 0], [0, 1, 0]) == 0.0  # constant prediction
    assert M.matthews([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    x, y = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([2.0, 4.1, 5.9, 8.2, 9.9])
    assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert M.spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)  # ties: average ranks
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert M.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)


# ---- tokenizers as they come ------------------------------------------------------------------


def _tokenizer(specials):
    from tokenizers import Tokenizer as TK, models, pre_tokenizers, trainers

    from lmtk.data.tokenizer import Tokenizer

    tk = TK(models.WordLevel(unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the cat sat on the mat"] * 5,
                           trainers.WordLevelTrainer(special_tokens=specials, vocab_size=100))
    return Tokenizer(tk)


def test_special_ids_are_read_from_the_tokenizer():
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<mask>"])  # RoBERTa's names, other ids
    assert (tok.unk_id, tok.cls_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3, 4)
    tok = _tokenizer(["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"])
    assert (tok.unk_id, tok.eos_id, tok.pad_id, tok.cls_id, tok.mask_id) == (0, 1, 2, 3, 4)


def test_masked_lm_on_a_tokenizer_without_mask_is_one_line():
    from lmtk.objectives import build_objective

    tok = _tokenizer(["[UNK]", "[PAD]", "[SEP]"])
    assert tok.mask_id is None and tok.cls_id is None
    cfg = OmegaConf.create({"name": "mlm", "mask_rate": 0.15, "mask_token_frac": 0.8, "random_token_frac": 0.1})
    with pytest.raises(UserError, match=r"the tokenizer has no mask token, which objective=mlm") as e:
        build_objective(cfg, tok)
    assert "\n" not in str(e.value)
    build_objective(OmegaConf.create({"name": "clm"}), tok)  # causal LM needs no [MASK]


def test_mlm_random_tokens_avoid_specials_anywhere():
    from lmtk.objectives import MLM

    tok = _tokenizer(["[UNK]", "[PAD]", "[SEP]"])
    tok.mask_id = 7  # pretend: a [MASK] in the middle of the vocabulary (a tokenizer from elsewhere)
    tok.special_ids = [0, 1, 2, 7]
    obj = MLM(OmegaConf.create({"name": "mlm", "mask_rate": 0.5, "mask_token_frac": 0.0, "random_token_frac": 1.0}), tok)
    batch = torch.full((8, 40), 5)
    x, pos = obj.corrupt(batch, torch.Generator().manual_seed(0))
    replaced = x.gather(1, pos)
    assert not torch.isin(replaced, torch.tensor([0, 1, 2, 7])).any()


# ---- the one base resolver ---------------------------------------------------------------------


def test_hf_base_goes_through_load_hf_or_says_the_import_is_absent(tmp_path, monkeypatch):
    """resolve_base: a directory with config.json (and no lmtk checkpoint) is a Hugging Face model,
    loaded by lmtk.models.hf.load_hf; without that module, one line says so."""
    import sys
    import types

    from lmtk.finetune.base import resolve_base

    hf = tmp_path / "hf-bert"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lmtk.models.hf", None)  # the import fails
    with pytest.raises(UserError, match="is a Hugging Face model directory, but this lmtk has no Hugging Face import") as e:
        resolve_base(str(hf), tmp_path / "runs")
    assert "\n" not in str(e.value)

    lm, seen = tiny(), []
    fake = types.ModuleType("lmtk.models.hf")
    fake.load_hf = lambda path: (seen.append(path), (lm, "TOK", {"objective": "mlm"}))[1]
    monkeypatch.setitem(sys.modules, "lmtk.models.hf", fake)
    base = resolve_base(str(hf), tmp_path / "runs")
    assert seen == [hf.resolve()] and base.lm is lm and base.tok == "TOK" and base.kind == "hf" and base.encoder


def test_lora_bias_all_trains_biases_too():
    model = tiny(bias=True)
    peft.apply(model, _cfg(bias="all"))
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} <= train
    assert any(n.endswith("lora_a") for n in train) and not any(n.endswith(".weight") for n in train)


# ---- local task files ----------------------------------------------------------------------------


def _task_cfg(**kw):
    base = {"source": "local", "name": None, "train": None, "val": None, "split": "train", "val_split": "validation",
            "text": "sentence", "text_pair": None, "label": "label", "kind": "auto", "num_labels": None,
            "metrics": ["accuracy"], "max_len": 8, "val_fraction": 0.25, "max_examples": None}
    return OmegaConf.create({**base, **kw})


def test_local_tasks_csv_jsonl_pairs_regression_and_padding(tmp_path):
    import json as _json

    from lmtk.finetune.tasks import load_task

    tok = _tokenizer(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('q,a,score\n"the cat, sat",on the mat,0.5\nthe mat,the cat sat on the mat the cat,1.25\n'
                        "cat,mat,2.0\nsat,on,3.5\n")
    task = load_task(_task_cfg(train=str(csv_path), text="q", text_pair="a", label="score"), tok, seed=0, encoder=True)
    assert task.kind == "regression" and task.metrics == ["pearson", "spearman"] and task.num_outputs == 1
    assert task.train.n == 3 and task.val.n == 1  # a quarter held out
    ids = task.train.ids + task.val.ids
    assert all(r[0] == tok.cls_id and r.count(tok.eos_id) == 2 and len(r) <= 8 for r in ids)  # [CLS] a [SEP] b [SEP], truncated
    b = task.train.get(0, 3)
    assert b["input_ids"].shape[1] == max(len(task.train.ids[task.train.example(s)]) for s in range(3))
    for row, m in zip(b["input_ids"], b["attention_mask"]):  # right padding with the tokenizer's [PAD] id
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any() and (row[n:] == tok.pad_id).all()
    assert b["labels"].dtype == torch.float32

    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(_json.dumps({"text": t, "y": y}) + "\n" for t, y in [("the cat", "pet"), ("the mat", "thing")] * 4))
    dev = tmp_path / "d.jsonl"
    dev.write_text(_json.dumps({"text": "cat", "y": "pet"}) + "\n")
    task = load_task(_task_cfg(train=str(jl), val=str(dev), text="text", label="y", metrics=["f1", "matthews"]), tok, 0, False)
    assert task.kind == "classification" and task.classes == ["pet", "thing"] and task.val.labels.tolist() == [0]
    assert all(r[-1] == tok.eos_id and tok.cls_id not in r for r in task.train.ids)  # causal: a [SEP], no [CLS]
    # sample s is always the same example: the data position is one integer
    assert [task.train.example(s) for s in range(20)] == [task.train.example(s) for s in range(20)]
    assert sorted(task.train.example(s) for s in range(8)) == list(range(8))


def test_resume_refuses_another_base(tmp_path):
    import json as _json

    from lmtk.finetune.run import _check_resume_base

    ck = tmp_path / "step-000007"
    ck.mkdir()
    (ck / "meta.json").write_text(_json.dumps({"finetune": {"base": "/runs/bert", "base_fingerprint": "aaaa"}}))
    _check_resume_base(ck, "aaaa", None)  # the same base: fine
    with pytest.raises(UserError, match=r"it fine-tuned another base \(/runs/bert\); pass base=/runs/bert"):
        _check_resume_base(ck, "bbbb", None)
