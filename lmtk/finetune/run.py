"""`lmtk finetune`: base -> task (or text) -> PEFT in the model -> the one loop -> a new run.

  resolve_base (finetune/base.py: lmtk run/checkpoint, else Hugging Face directory)
  -> a task (finetune/tasks.py), tokenised with the base's tokenizer, or text data (TokenCache)
  -> the base's recurrent state widened when model.mixer.state_expand asks (finetune/expand.py: StateX)
  -> TaskModel(base, head) or the base itself; peft.apply (full | bitfit | lora)
  -> resume checks -> RunDir (kind finetune, parents {base}) -> train.loop.fit(Job)
  -> summary (task metric per epoch, best score, trainable parameters), eval/finetune.json,
     adapter.safetensors + adapter.json for bitfit / lora
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time

import torch
from omegaconf import OmegaConf

from lmtk import peft
from lmtk.checkpoint import write_atomic
from lmtk.errors import UserError
from lmtk.finetune import expand
from lmtk.finetune.base import Base, resolve_base
from lmtk.log import console, make_sinks, null_sinks
from lmtk.runs import RunDir, runs_root
from lmtk.train import resume
from lmtk.train.loop import Job, fit

SUITE = "finetune"  # eval/<suite>.json, the eval framework's layout


def run(cfg, recipe: str, overrides: list[str]) -> dict:
    from lmtk import dist as distributed

    if cfg.get("teacher") is not None:
        raise UserError(f"teacher={cfg.teacher} is a distillation setting: use lmtk distill (lmtk finetune starts from base=)")
    refuse = "lmtk finetune runs data-parallel with launcher.strategy=ddp (fsdp shards pretraining's models only)"
    with distributed.session(cfg, refuse_fsdp=refuse) as (dev, dtype, dist):
        return _run(cfg, recipe, overrides, dev, dtype, dist)


def _run(cfg, recipe, overrides, dev, dtype, dist) -> dict:
    root = runs_root(cfg.run.root)
    default = cfg.run.name or f"{recipe}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    name, ckpt = resume.target(cfg, dist.broadcast(default))
    base = resolve_base(cfg.base, root)
    with_task = cfg.task.source != "none"
    if not any(o.split("=")[0].lstrip("+") in ("objective", "objective.name") for o in overrides) and base.objective \
            and not with_task and base.objective in ("clm", "mlm", "antlm", "gpt-bert", "mtp", "rts"):
        OmegaConf.update(cfg, "objective.name", base.objective)  # continued LM training: the base's own objective
    OmegaConf.update(cfg, "run.name", name)
    OmegaConf.update(cfg, "base", base.path)
    base_fp = peft.fingerprint(base.lm)
    factor = expand.requested(cfg)
    if factor:
        expand.check(base.lm, factor, cfg.peft.method)
        before = expand.state_size(base.lm)
        base.lm = expand.expand_state(base.lm, factor, cfg.seed)
        console.print(f"state expansion x{factor}: recurrent state {before:,} -> {expand.state_size(base.lm):,} entries per sequence "
                      "(the output unchanged at step 0)")
    _take_model_config(cfg, base)

    task = data = None
    if with_task:
        from lmtk.finetune.tasks import load_task

        task = load_task(cfg.task, base.tok, cfg.seed, base.encoder)
        data_meta = {"train_tokens": task.train.tokens(), "val_tokens": task.val.tokens()}
        if cfg.val.every == 0:  # validate after every epoch
            OmegaConf.update(cfg, "val.every", max(1, math.ceil(task.train.n / cfg.train.batch_size)))
    else:
        data = lm_data(cfg, base)
        data_meta = {"train_tokens": int(data.meta["train_tokens"]), "val_tokens": int(data.meta["val_tokens"])}

    torch.manual_seed(cfg.seed)
    model, info, skip = build(base, cfg, task)
    ft_meta = {
        "base": base.path, "base_fingerprint": base_fp, "base_kind": base.kind, "base_objective": base.objective,
        "encoder": base.encoder, "peft": OmegaConf.to_container(cfg.peft, resolve=True),
        "head": model.head_meta() if task is not None else None, "skip": list(skip),
        "added_biases": base.added_biases + [n[3:] if n.startswith("lm.") else n for n in info["added_biases"]],
        "task": task.describe() if task is not None else None, "state_expand": factor,
    }
    same = ckpt is not None and resume.same_run(cfg, name, ckpt)
    ckpt_step, changes = 0, {}
    if ckpt is not None:
        ckpt_step, changes = resume.check(ckpt, cfg, base.lm.cfg.to_dict(), base.tok, data_meta, same)
        _check_resume_base(ckpt, base_fp, cfg)
    if not dist.main:
        return _train(cfg, None, base, model, info, task, data, dev, dtype, ckpt, dist, data_meta, ft_meta)
    from lmtk.train.pretrain import _describe

    return RunDir.write_run(
        root, cfg, kind="finetune", recipe=recipe, overrides=overrides, device=_describe(dev, dtype, dist.world, dist.strategy),
        save_tokenizer=base.tok.save, model=base.lm.cfg.to_dict(), ckpt=ckpt, ckpt_step=ckpt_step, changes=changes, same=same,
        parents={"base": base.path},
        body=lambda rundir: _train(cfg, rundir, base, model, info, task, data, dev, dtype, ckpt, dist, data_meta, ft_meta))


def _take_model_config(cfg, base: Base) -> None:
    """config.yaml says what the model is: the base's architecture, not the recipe's placeholder."""
    from lmtk.schema import ModelCfg
    from dataclasses import fields

    known = {f.name for f in fields(ModelCfg)}
    for k, v in base.lm.cfg.to_dict().items():
        if k in known:
            OmegaConf.update(cfg, f"model.{k}", v, merge=False)


def _check_resume_base(ckpt, base_fp: str, cfg) -> None:
    from lmtk import checkpoint

    ft = checkpoint.read_meta(ckpt).get("finetune")
    if ft is None:
        return  # a pretraining checkpoint as the starting point of a new run
    if ft.get("base_fingerprint") != base_fp:
        raise UserError(f"cannot resume from {ckpt}: it fine-tuned another base ({ft.get('base')}); pass base={ft.get('base')}")


def lm_data(cfg, base: Base):
    """Continued LM training: the data through the base's tokenizer (no tokenizer is trained)."""
    from lmtk.data.packing import TokenCache
    from lmtk.data.sources import Source

    base.tok.require("eos", why="training on text (documents are separated by [SEP])")
    if base.lm.cfg.positions in ("learned", "sinusoidal") and cfg.data.seq_len > base.lm.cfg.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the base's max_seq_len={base.lm.cfg.max_seq_len}")
    t0 = time.perf_counter()
    cache = TokenCache(Source(cfg.data), base.tok, cfg.data.seq_len)
    if not cache.hit:
        console.print(f"tokenised {cache.meta['train_chars'] / 1e6:.1f} MB into {cache.meta['train_tokens']:,} tokens "
                      f"in {time.perf_counter() - t0:.1f}s")
    return cache


def build(base: Base, cfg, task):
    """The model that trains: the base, wrapped in a task head when there is a task, with the
    PEFT method applied. Returns (model, peft info, module names PEFT leaves alone)."""
    from lmtk.finetune.model import TaskModel

    if task is not None:
        model = TaskModel(base.lm, task.num_outputs, causal=not base.encoder, pooling=cfg.head.pooling, dropout=cfg.head.dropout)
        if model.pooling == "first" and base.tok.cls_id is None and base.encoder:
            console.print("note: the tokenizer has no [CLS]; the encoder pools its first real token")
        skip = ("lm.head",)  # the LM head is not used by a task
    else:
        model, skip = base.lm, ()
    info = peft.apply(model, cfg.peft, skip=skip)
    return model, info, skip


def _train(cfg, rundir, base, model, info, task, data, dev, dtype, ckpt, dist, data_meta, ft_meta) -> dict:
    from lmtk.data.packing import Batches
    from lmtk.objectives import build_objective
    from lmtk.objectives.task import TaskObjective

    sinks = make_sinks(cfg, rundir, rundir.name) if rundir is not None else null_sinks()
    trainable, total = peft.count(model)
    line = peft.describe(model, info)
    validate = None
    if task is not None:
        objective = TaskObjective(task.kind, bidirectional=base.encoder)
        train_data, val_data, val_objectives, seq_len = task.train, None, {}, cfg.task.max_len

        def validate(m):
            return task_metrics(m, task, objective, dev, dtype, cfg.train.micro_batch_size)
        what = f"{task.name} ({task.kind}, {task.train.n:,} train / {task.val.n:,} val examples)"
    else:
        objective = build_objective(cfg.objective, base.tok)
        objective.attach(model)  # an objective's own heads (mtp, rts) start fresh: a base keeps none
        val_objectives = objective.val_objectives(cfg.val.mask_rate)
        if model.causal_only:
            val_objectives.pop("mlm", None)
        train_data = Batches(data.train, cfg.data.seq_len, cfg.seed)
        val_data = Batches(data.val, cfg.data.seq_len, cfg.seed, nbytes=data.val_bytes)
        seq_len = cfg.data.seq_len
        what = f"text ({data.meta['train_tokens']:,} train tokens, {objective.name})"
    if rundir is not None:
        sinks.console.message(f"[bold]{cfg.run.name}[/bold]: base {base.describe()} | {what} | {cfg.recipe} | {rundir.path}")
        sinks.console.message(line)
        if ckpt is None:
            sinks.log({"trainable_params": trainable, "params": total, "trainable_fraction": trainable / max(1, total)}, 0)
    job = Job(
        cfg=cfg, model=model, objective=objective, train_data=train_data, val_data=val_data,
        val_objectives=val_objectives, run=rundir, sinks=sinks, device=dev, dtype=dtype,
        model_meta=base.lm.cfg.to_dict(), resume_from=ckpt, dist=dist, tokenizer_json=base.tok.to_json(),
        data_meta=data_meta, validate=validate, meta={"finetune": ft_meta}, seq_len=seq_len,
    )
    t0 = time.perf_counter()
    try:
        summary = fit(job)
    finally:
        sinks.close()
    if rundir is None:
        return summary
    summary.update(params=total, trainable_params=trainable, trainable_fraction=trainable / max(1, total), peft=info["method"])
    if task is not None:
        epochs = per_epoch(rundir, task.train.n, cfg.train.batch_size)
        best = max(epochs, key=lambda e: e["score"]) if epochs else None
        summary.update(task=task.name, epochs=epochs, best_score=best["score"] if best else None,
                       best_epoch=best["epoch"] if best else None)
        with open(rundir.metrics_path, "a") as f:
            f.write(json.dumps({"step": summary["steps"], "best/score": summary["best_score"], "best/epoch": summary["best_epoch"],
                                "trainable_params": trainable, "trainable_fraction": summary["trainable_fraction"]}) + "\n")
    if info["method"] != "full":
        peft.save_adapter(model, rundir.path, adapter_meta(ft_meta, base, cfg))
    write_eval(rundir, cfg, summary, task, time.perf_counter() - t0)
    print_summary(rundir.name, summary)
    return summary


def adapter_meta(ft_meta: dict, base: Base, cfg) -> dict:
    return {
        "format": 1, "method": ft_meta["peft"]["method"], "peft": ft_meta["peft"], "head": ft_meta["head"],
        "skip": ft_meta["skip"], "task": ft_meta["task"], "added_biases": ft_meta["added_biases"],
        "base": {"path": base.path, "fingerprint": ft_meta["base_fingerprint"], "model": base.lm.cfg.to_dict()},
    }


@torch.no_grad()
def task_metrics(model, task, objective, device, dtype, batch_size: int) -> dict:
    """val/loss and val/<metric> for each of the task's metrics, val/score (the first) on the
    whole validation split, in order, dropout off."""
    from lmtk.device import autocast
    from lmtk.finetune.metrics import compute

    was = model.training
    model.eval()
    total, preds = 0.0, []
    try:
        for b in task.val.ordered(batch_size):
            b = {k: v.to(device) for k, v in b.items()}
            with autocast(device, dtype):
                logits = model(b["input_ids"], attention_mask=b["attention_mask"])
            total += float(objective.losses(logits, b["labels"]).double().sum())
            preds.append(objective.predictions(logits).cpu())
    finally:
        model.train(was)
    pred = torch.cat(preds).numpy()
    scores = compute(task.metrics, pred, task.val.labels)
    out = {"val/loss": total / task.val.n, **{f"val/{k}": v for k, v in scores.items()}}
    out["val/score"] = scores[task.metrics[0]]
    return out


def per_epoch(rundir, n_train: int, batch_size: int) -> list[dict]:
    """The validation rows of metrics.jsonl, one per epoch: {epoch, step, score, metrics}."""
    out = []
    for line in rundir.metrics_path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val/score" in m:
            vals = {k[4:]: v for k, v in m.items() if k.startswith("val/")}
            out.append({"epoch": round(m["step"] * batch_size / n_train, 2), "step": m["step"], "score": m["val/score"], "metrics": vals})
    return out


def write_eval(rundir, cfg, summary: dict, task, wall: float) -> None:
    """runs/<run>/eval/finetune.json: the eval framework's layout (eval/<suite>.json)."""
    import lmtk

    final = rundir.ckpt_dir / "final"
    result = {
        "suite": SUITE, "run": rundir.name, "checkpoint": str(final), "lmtk": lmtk.__version__, "seed": cfg.seed,
        "wall_seconds": wall, "base": cfg.base, "peft": cfg.peft.method,
        "trainable_params": summary["trainable_params"], "params": summary["params"],
        "trainable_fraction": summary["trainable_fraction"],
    }
    if task is not None:
        result.update(task=task.name, kind=task.kind, metrics=task.metrics, samples=task.val.n, train_examples=task.train.n,
                      scores={k[4:]: v for k, v in summary.items() if k.startswith("val/")},
                      best={"score": summary["best_score"], "epoch": summary["best_epoch"]}, epochs=summary["epochs"])
    else:
        result.update(task=None, samples=None, scores={k[4:]: v for k, v in summary.items() if k.startswith("val/")})
    d = rundir.path / "eval"
    d.mkdir(exist_ok=True)
    write_atomic(d / f"{SUITE}.json", json.dumps(result, indent=2, default=str))


def print_summary(name: str, s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {name}", show_header=False)
    rows = [("steps", f"{s['steps']:,}"), ("train time", f"{s['train_seconds']:.1f} s"),
            ("peft", str(s.get("peft"))),
            ("trainable parameters", f"{s['trainable_params']:,} of {s['params']:,} ({100 * s['trainable_fraction']:.2f}%)"),
            ("final train loss", f"{s['train_loss']:.4f}" if s.get("train_loss") is not None else "-")]
    if s.get("task"):
        rows.append(("task", s["task"]))
        for e in s.get("epochs", []):
            rows.append((f"epoch {e['epoch']:g} score", f"{e['score']:.4f}"))
        if s.get("best_score") is not None:
            rows.append(("best validation score", f"{s['best_score']:.4f} (epoch {s['best_epoch']:g})"))
    for key, label in (("val/loss", "val loss"), ("val/bpb", "val bits/byte")):
        if key in s:
            rows.append((label, f"{s[key]:.4f}"))
    for r in rows:
        t.add_row(*r)
    console.print(t)
