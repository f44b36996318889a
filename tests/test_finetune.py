"""`lmtk finetune` end to end on tiny bases: a sentiment task built from word lists is learned
well above chance; LoRA runs write an adapter that reloads onto its base and are bases
themselves; a resumed run equals an uninterrupted one mid-epoch; LoRA continued LM training on
text lowers the loss and leaves the base weights alone; GLUE goes through `datasets`."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

import helpers

POS = "good great excellent wonderful lovely superb fantastic delightful brilliant pleasant".split()
NEG = "bad awful terrible horrible dreadful poor nasty boring ugly miserable".split()
FILL = "the movie was a story and it felt with some actors in this plot really quite".split()


def write_task(path, n, seed, pair=False):
    """Sentences of five filler words and one sentiment word; label 1 for a positive word."""
    rng = random.Random(seed)

    def sent(words):
        w = rng.sample(FILL, 5) + [rng.choice(words)]
        rng.shuffle(w)
        return " ".join(w)

    with open(path, "w") as f:
        f.write("sentence\tlabel\n" if not pair else "sentence\tother\tlabel\n")
        for i in range(n):
            y = i % 2
            s = sent(POS if y else NEG)
            f.write(f"{s}\t{y}\n" if not pair else f"{s}\t{rng.choice(FILL)} {rng.choice(FILL)}\t{y}\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_cache):
    """Two tiny bases (a causal GPT and a masked-LM encoder) and the task files."""
    root = tmp_path_factory.mktemp("ft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(root / "bases"))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*helpers.TINY, "budget.steps=5", "run.name=gpt")
        helpers.train(*helpers.TINY, "budget.steps=5", "objective=mlm", "run.name=bert")
    helpers.reset_console()
    return {"gpt": root / "bases" / "gpt", "bert": root / "bases" / "bert",
            "train": write_task(root / "train.tsv", 240, 0), "dev": write_task(root / "dev.tsv", 60, 1)}


def task_args(world):
    return ["task=local", f"task.train={world['train']}", f"task.val={world['dev']}", "train.lr=2e-3", "logger.every=5"]


def finetune(*args):
    return helpers.ok("finetune", *args)


def test_full_finetune_learns_sentiment_well_above_chance(world, lmtk_env):
    res = finetune(f"base={world['gpt']}", *task_args(world), "peft=full", "run.name=sst")
    run = lmtk_env.runs / "sst"
    info = helpers.info(run)
    assert info["kind"] == "finetune" and info["status"] == "done"
    assert info["parents"]["base"] == str(world["gpt"].resolve())
    s = info["summary"]
    assert s["best_score"] >= 0.85, s["epochs"]  # chance is 0.5 (balanced classes)
    assert s["trainable_fraction"] == 1.0 and s["trainable_params"] == s["params"]
    scores = [m for m in helpers.metrics(run) if "val/accuracy" in m]
    assert [m["step"] for m in scores] == [15, 30, 45, 60, 75]  # 240 examples / batch 16: every epoch
    assert [e["epoch"] for e in s["epochs"]] == [1, 2, 3, 4, 5]
    rows = helpers.metrics(run)
    assert rows[0]["trainable_params"] == s["params"] and rows[-1]["best/score"] == s["best_score"]
    ev = json.loads((run / "eval" / "finetune.json").read_text())
    assert ev["suite"] == "finetune" and ev["samples"] == 60 and ev["seed"] == 0 and ev["lmtk"]
    assert ev["checkpoint"].endswith("checkpoints/final") and ev["wall_seconds"] > 0
    assert ev["best"]["score"] == s["best_score"] and set(ev["scores"]) >= {"accuracy", "loss", "score"}
    assert "best validation score" in res.output and "trainable parameters" in res.output
    assert not (run / "adapter.safetensors").exists()  # full fine-tuning has no adapter


def test_lora_encoder_adapter_reloads_and_the_run_is_a_base(world, lmtk_env):
    from lmtk import checkpoint, peft
    from lmtk.finetune.base import rebuild, resolve_base
    from lmtk.finetune.model import build_task_model
    from lmtk.models import ModelConfig, build_model

    finetune(f"base={world['bert']}", *task_args(world), "peft=lora", "peft.dora=true", "budget.epochs=1", "run.name=lora")
    run = lmtk_env.runs / "lora"
    s = helpers.info(run)["summary"]
    assert 0 < s["trainable_fraction"] < 0.2
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["head"]["pooling"] == "first" and meta["head"]["causal"] is False  # an encoder base
    # the final checkpoint's model == the adapter loaded onto a fresh copy of the base
    ckpt = run / "checkpoints" / "final"
    ck_meta = checkpoint.read_meta(ckpt)
    model, _ = rebuild(build_model(ModelConfig.from_dict(ck_meta["model"])), ck_meta["finetune"])
    checkpoint.load_weights(model, ckpt)
    base = resolve_base(str(world["bert"]), None)
    loaded = peft.load_adapter(base.lm, run, build_head=build_task_model)
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids, attention_mask=mask), model.eval()(ids, attention_mask=mask))
    # an adapter run is a base like any other (merged; head dropped); so is the adapter directory alone
    finetune(f"base={run}", *task_args(world), "peft=bitfit", "budget.epochs=null", "budget.steps=3", "run.name=again")
    again = helpers.info(lmtk_env.runs / "again")
    assert again["parents"]["base"] == str(run) and again["status"] == "done"
    alone = lmtk_env.runs.parent / "adapter-only"
    alone.mkdir()
    for f in ("adapter.json", "adapter.safetensors"):
        shutil.copy(run / f, alone / f)
    b = resolve_base(str(alone), None)
    with torch.no_grad():
        torch.testing.assert_close(b.lm(ids), peft.merge(loaded).lm(ids), atol=1e-5, rtol=1e-5)


def _crash(run, after: int) -> None:
    ck = run / "checkpoints"
    shutil.rmtree(ck / "final")
    for d in ck.iterdir():
        if d.name.startswith("step-") and int(d.name[5:]) > after:
            shutil.rmtree(d)
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= after]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    info = helpers.info(run)
    info["status"] = "running"
    info.pop("summary", None)
    (run / "run.json").write_text(json.dumps(info))
    for f in ("adapter.json", "adapter.safetensors"):
        (run / f).unlink(missing_ok=True)
    shutil.rmtree(run / "eval", ignore_errors=True)


def test_resume_mid_epoch_equals_uninterrupted(world, lmtk_env):
    """15 steps per epoch, a checkpoint every 7: the crash after step 16 resumes from step 14,
    mid-epoch, and ends with the same weights and per-step losses (head dropout on: RNG restored)."""
    common = [f"base={world['gpt']}", *task_args(world), "peft=lora", "budget.epochs=2", "logger.every=1",
              "checkpoint.every=7", "checkpoint.keep=5"]
    finetune(*common, "run.name=A")
    a, c = lmtk_env.runs / "A", lmtk_env.runs / "C"
    shutil.copytree(a, c)
    _crash(c, after=16)
    finetune(*common, "run.name=C", "resume=auto")
    wa, wc = load_file(str(a / "checkpoints/final/model.safetensors")), load_file(str(c / "checkpoints/final/model.safetensors"))
    assert wa.keys() == wc.keys()
    for k in wa:
        assert torch.equal(wa[k], wc[k]), k
    la = {m["step"]: m["loss"] for m in helpers.metrics(a) if "loss" in m}
    lc = {m["step"]: m["loss"] for m in helpers.metrics(c) if "loss" in m}
    assert la == lc and len(la) == 30
    assert helpers.info(c)["history"][0]["step"] == 14
    va = [m["val/score"] for m in helpers.metrics(a) if "val/score" in m]
    assert va == [m["val/score"] for m in helpers.metrics(c) if "val/score" in m] and len(va) == 2


def test_lora_continued_lm_training_on_text_lowers_loss(clm_run, lmtk_env, tmp_path):
    """A trained base (conftest's clm run, on code) adapts to English-like text with LoRA alone."""
    d = tmp_path / "domain"
    d.mkdir()
    rng = random.Random(0)
    for i in range(3):
        (d / f"{i}.txt").write_text("\n\n".join(" ".join(rng.choice(POS + FILL) for _ in range(60)) for _ in range(40)))
    finetune(f"base={clm_run}", "data=text", f"data.train={d}/*.txt", "peft=lora", "peft.targets=[*mixer.*,*mlp.*]", "train.lr=2e-2",
             "budget.epochs=null", "budget.steps=40", "data.seq_len=32", "train.batch_size=8", "train.micro_batch_size=8",
             "val.at_start=true", "val.tokens=2048", "run.name=lm")
    run = lmtk_env.runs / "lm"
    vals = [m["val/loss"] for m in helpers.metrics(run) if "val/loss" in m]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.2, vals
    base = load_file(str(clm_run / "checkpoints/final/model.safetensors"))
    tuned = load_file(str(run / "checkpoints/final/model.safetensors"))
    for k, v in base.items():
        assert torch.equal(tuned[k], v), f"base weight {k} changed under LoRA"
    assert any(k.endswith("lora_b") for k in tuned) and (run / "adapter.safetensors").is_file()
    assert helpers.info(run)["summary"]["trainable_fraction"] < 0.2
    # the run loads like any other (LoRA merged): what `lmtk generate` and evaluation read
    from lmtk.checkpoint import load_pretrained

    model, tok, _ = load_pretrained(run)
    assert not any("lora" in k for k in model.state_dict())
    assert helpers.cli("generate", str(run), "-p", "good", "-n", "5").exit_code == 0


def test_glue_task_through_datasets(world, lmtk_env, monkeypatch):
    """task=glue/mrpc: datasets.load_dataset('nyu-mll/glue', 'mrpc') (faked here: tests are offline),
    sentence pairs, F1 as the score."""
    import datasets

    def rows(n, seed):
        rng = random.Random(seed)
        out = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
        for i in range(n):
            y = i % 2
            out["sentence1"].append(" ".join(rng.sample(FILL, 4) + [rng.choice(POS if y else NEG)]))
            out["sentence2"].append(" ".join(rng.sample(FILL, 3)))
            out["label"].append(y)
            out["idx"].append(i)
        return datasets.Dataset.from_dict(out)

    calls = []

    def fake(name, config=None, **kw):
        calls.append((name, config))
        return datasets.DatasetDict({"train": rows(64, 0), "validation": rows(32, 1), "test": rows(8, 2)})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    finetune(f"base={world['gpt']}", "task=glue/mrpc", "peft=full", "budget.epochs=1", "train.lr=2e-3", "run.name=mrpc")
    assert calls == [("nyu-mll/glue", "mrpc")]
    ev = json.loads((lmtk_env.runs / "mrpc" / "eval" / "finetune.json").read_text())
    assert ev["task"] == "glue/mrpc" and ev["metrics"] == ["f1", "accuracy"] and ev["samples"] == 32
    assert ev["scores"]["score"] == ev["scores"]["f1"]


def test_two_ranks_equal_one_process(world, lmtk_env):
    """launcher.nproc=2 (DDP on gloo), micro-batches of 4 in a batch of 16: each rank accumulates 2,
    and the example-count weights are over the step's total on both ranks."""
    common = [f"base={world['gpt']}", *task_args(world), "peft=lora", "head.dropout=0", "budget.epochs=null", "budget.steps=4",
              "train.micro_batch_size=4", "logger.every=1"]
    one = helpers.lmtk("finetune", *common, "run.name=one", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = helpers.lmtk("finetune", *common, "run.name=two", "launcher.nproc=2", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    la = [m["loss"] for m in helpers.metrics(lmtk_env.runs / "one") if "loss" in m]
    lb = [m["loss"] for m in helpers.metrics(lmtk_env.runs / "two") if "loss" in m]
    assert len(la) == 4 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (la, lb)
    wa = load_file(str(lmtk_env.runs / "one/checkpoints/final/model.safetensors"))
    wb = load_file(str(lmtk_env.runs / "two/checkpoints/final/model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert "x 2 ranks" in helpers.info(lmtk_env.runs / "two")["device"]
