"""`lmtk distill`: a teacher -> a student with other mixers -> transfer -> stages in the one loop -> a run.

  resolve_base (finetune/base.py: the teacher as a base: lmtk run / checkpoint, or a Hugging Face
  directory), frozen and in eval mode; its tokenizer is the student's, its data the default
  -> the student's ModelConfig: the teacher's with model.mixer and model.layers replaced
  -> transfer (distill.init) -> peft.apply (peft=lora: adapters for the kd stage)
  -> DistillObjective (distill.stages) -> resume checks (the teacher by fingerprint)
  -> RunDir (kind distill, parents {teacher}) -> train.loop.fit(Job) -> summary with the teacher's
     val loss beside the student's and the share of the teacher's gain over unigram recovered
"""

from __future__ import annotations

import datetime as _dt

import torch
from omegaconf import OmegaConf

from lmtk import peft
from lmtk.errors import UserError
from lmtk.log import console, make_sinks, null_sinks
from lmtk.runs import RunDir, runs_root
from lmtk.train import resume
from lmtk.train.loop import Job, fit

# model.* keys a distillation may set: the rest is the teacher's
STUDENT_KEYS = ("model.mixer", "model/mixer", "model.layers")


def run(cfg, recipe: str, overrides: list[str]) -> dict:
    from lmtk import dist as distributed

    _refuse_model_keys(overrides)
    for key, unset in (("base", None), ("task.source", "none")):
        if OmegaConf.select(cfg, key) != unset:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} is a fine-tuning setting: use lmtk finetune (lmtk distill starts from teacher=)")
    with distributed.session(cfg) as (dev, dtype, dist):
        return _run(cfg, recipe, overrides, dev, dtype, dist)


def _refuse_model_keys(overrides: list[str]) -> None:
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if (key.startswith("model.") or key.startswith("model/") or key == "model") and not key.startswith(STUDENT_KEYS):
            raise UserError(f"{key}: the student is the teacher's model with model/mixer= and model.layers= replaced; "
                            "only those can be set for lmtk distill")


def _run(cfg, recipe, overrides, dev, dtype, dist) -> dict:
    from lmtk.finetune.base import resolve_base
    from lmtk.finetune.run import lm_data

    root = runs_root(cfg.run.root)
    default = cfg.run.name or f"{recipe}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    name, ckpt = resume.target(cfg, dist.broadcast(default))
    teacher = resolve_base(cfg.teacher, root, key="teacher", command="distill")
    if teacher.encoder:
        raise UserError(f"teacher={cfg.teacher} is a masked (encoder) model ({teacher.objective}); lmtk distill "
                        "distils a causal (decoder) teacher into a left-to-right student")
    OmegaConf.update(cfg, "run.name", name)
    OmegaConf.update(cfg, "teacher", teacher.path)
    _take_teacher_data(cfg, teacher, overrides)
    tok = _student_tokenizer(cfg, teacher)
    scfg = student_config(cfg, teacher.lm.cfg)
    _take_student_config(cfg, scfg)
    stages = _stages(cfg)
    data = lm_data(cfg, teacher)
    data_meta = {"train_tokens": int(data.meta["train_tokens"]), "val_tokens": int(data.meta["val_tokens"])}

    torch.manual_seed(cfg.seed)
    student, objective, record, info = build(cfg, teacher, scfg, stages, dev)
    t_fp = peft.fingerprint(teacher.lm)
    meta = {"teacher": teacher.path, "teacher_fingerprint": t_fp, "init": record["init"], "stages": [list(s) for s in stages],
            "kept": record["kept"], "qkv": record["qkv"], "copied": len(record["copied"]), "aligned": objective.layers, "peft": info["method"]}
    same = ckpt is not None and resume.same_run(cfg, name, ckpt)
    ckpt_step, changes = 0, {}
    if ckpt is not None:
        ckpt_step, changes = resume.check(ckpt, cfg, scfg.to_dict(), tok, data_meta, same)
        _check_resume_teacher(ckpt, t_fp, cfg)
    if not dist.main:
        return _train(cfg, None, teacher, student, objective, tok, data, dev, dtype, ckpt, dist, data_meta, meta, info)
    from lmtk.train.pretrain import _describe

    return RunDir.write_run(
        root, cfg, kind="distill", recipe=recipe, overrides=overrides, device=_describe(dev, dtype, dist.world, dist.strategy),
        save_tokenizer=tok.save, model=scfg.to_dict(), ckpt=ckpt, ckpt_step=ckpt_step, changes=changes, same=same,
        parents={"teacher": teacher.path},
        body=lambda rundir: _train(cfg, rundir, teacher, student, objective, tok, data, dev, dtype, ckpt, dist, data_meta, meta, info))


def _take_teacher_data(cfg, teacher, overrides: list[str]) -> None:
    """The teacher run's data section, with the command's data.* overrides on top (data.seq_len=64
    keeps the teacher's corpus); a data= group choice (data=text ...) means other data: the
    command's alone. A Hugging Face teacher has no data of its own: the command's."""
    from lmtk import checkpoint

    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if "data" in keys or teacher.ckpt is None:
        return
    text = checkpoint.config_text(teacher.ckpt)
    saved = OmegaConf.create(text).get("data") if text else None
    if saved is None:
        return
    for k, v in OmegaConf.to_container(saved, resolve=True).items():
        if k in cfg.data and f"data.{k}" not in keys:
            OmegaConf.update(cfg, f"data.{k}", v, merge=False)


def _student_tokenizer(cfg, teacher):
    """The teacher's tokenizer; tokenizer.path, when given, must be the same vocabulary."""
    from lmtk.data.tokenizer import Tokenizer

    tok = teacher.tok
    if cfg.tokenizer.path:
        try:
            other = Tokenizer.from_file(cfg.tokenizer.path)
        except Exception as err:  # a missing or unreadable file
            raise UserError(f"tokenizer.path={cfg.tokenizer.path}: cannot read a tokenizer there ({err.__class__.__name__})") from None
        if other.fingerprint() != tok.fingerprint():
            raise UserError(f"tokenizer.path={cfg.tokenizer.path} is not the teacher's tokenizer ({other.vocab_size} vs "
                            f"{tok.vocab_size} tokens): a student learns the teacher's distribution over the teacher's ids; "
                            "leave tokenizer.path unset")
    if tok.vocab_size > teacher.lm.cfg.vocab_size:
        raise UserError(f"the teacher's tokenizer has {tok.vocab_size} tokens but its model only {teacher.lm.cfg.vocab_size} "
                        "output rows: the teacher's vocabulary does not match its tokenizer")
    return tok


def student_config(cfg, tcfg):
    """The teacher's ModelConfig with model.mixer and model.layers replaced (one-line errors: a
    pattern of the wrong length, unknown mixers, knobs)."""
    from lmtk.models import ModelConfig
    from lmtk.models.mixers import layer_mixers

    mixer = OmegaConf.to_container(cfg.model.mixer, resolve=True) if OmegaConf.is_config(cfg.model.mixer) else dict(cfg.model.mixer)
    layers = cfg.model.layers
    layers = layers if layers is None or isinstance(layers, str) else list(layers)
    try:
        layer_mixers(layers, tcfg.n_layers, mixer["name"])
    except UserError as err:
        raise UserError(f"{err} (the teacher's: the student has as many layers as its teacher)") from None
    if cfg.distill.shape == "attention":
        from lmtk.models.mixers import MIXERS, mixer_config

        knobs = MIXERS[mixer["name"]].attention_knobs(tcfg, mixer) if mixer["name"] != "attention" else {}
        if knobs is None:
            raise UserError(f"distill.shape=attention: model.mixer={mixer['name']} has no setting with attention's q, k, v, o shapes; "
                            "use distill.shape=config")
        mixer = mixer_config({**mixer, **knobs})
    return ModelConfig.from_dict({**tcfg.to_dict(), "mixer": mixer, "layers": layers})


def _take_student_config(cfg, scfg) -> None:
    """config.yaml says what the student is: the teacher's architecture with the student's mixers."""
    from dataclasses import fields

    from lmtk.schema import ModelCfg

    known = {f.name for f in fields(ModelCfg)}
    for k, v in scfg.to_dict().items():
        if k in known:
            OmegaConf.update(cfg, f"model.{k}", v, merge=False)


def _stages(cfg):
    from lmtk.distill.kd import KL_DIRECTIONS
    from lmtk.distill.stages import parse_stages

    d = cfg.distill
    if not 0 <= d.alpha <= 1:
        raise UserError(f"distill.alpha={d.alpha} must be in [0, 1] (the weight of the labels' cross-entropy)")
    if not d.temperature > 0:
        raise UserError(f"distill.temperature={d.temperature} must be positive")
    if d.kl not in KL_DIRECTIONS:
        raise UserError(f"distill.kl={d.kl} is not one of: {', '.join(KL_DIRECTIONS)}")
    return parse_stages(OmegaConf.to_container(d.stages, resolve=True) if OmegaConf.is_config(d.stages) else d.stages)


def build(cfg, teacher, scfg, stages, dev):
    """(student, DistillObjective, transfer record, peft info): the student built and initialised
    from the teacher, PEFT applied, and which parameters each stage trains."""
    from lmtk.distill.stages import DistillObjective
    from lmtk.distill.transfer import resolve_init, transfer
    from lmtk.models import build_model

    student = build_model(scfg)
    init, note = resolve_init(cfg.distill.init, student, teacher.lm)
    if note:
        console.print(f"note: {note}")
    record = transfer(student, teacher.lm, init)
    kept = set(record["kept"])
    aligned = [i for i in range(scfg.n_layers) if i not in kept]
    info = peft.apply(student, cfg.peft)
    trainable = None
    if info["method"] != "full":
        trainable = stage_parameters(student, stages, aligned, set(record["copied"]))
        for n, p in student.named_parameters():
            p.requires_grad_(any(n in names for names in trainable.values()))
    t = teacher.lm.to(dev).eval()
    t.requires_grad_(False)
    objective = DistillObjective(t, stages, aligned, cfg.distill, cfg.objective, student=student, trainable=trainable)
    return student, objective, record, info


def stage_parameters(student, stages, aligned: list[int], copied: set) -> dict:
    """{stage: parameter names it trains} under PEFT: the alignment stages train the aligned
    layers' parameters that were not copied from the teacher (nor PEFT's own), kd what PEFT left
    trainable (LoRA's adapters; peft.bias=all: the biases)."""
    adapters = {n for n, p in student.named_parameters() if p.requires_grad}
    names = [n for n, _ in student.named_parameters()]
    out = {"kd": adapters}
    for stage, prefix in (("mixer", "blocks.{}.mixer."), ("hidden", "blocks.{}.")):
        out[stage] = {n for n in names for i in aligned if n.startswith(prefix.format(i)) and n not in copied and n not in adapters}
    for stage, _ in stages:
        if not out[stage]:
            what = "adapters (peft.targets match no student layer?)" if stage == "kd" else \
                "fresh (not copied) parameters in the aligned layers: with peft=lora the teacher's copies stay frozen"
            raise UserError(f"distill stage {stage} has nothing to train: no {what}; drop the stage or use peft=full")
    return out


def _check_resume_teacher(ckpt, t_fp: str, cfg) -> None:
    from lmtk import checkpoint

    d = checkpoint.read_meta(ckpt).get("distill")
    if d is not None and d.get("teacher_fingerprint") != t_fp:
        raise UserError(f"cannot resume from {ckpt}: it was distilled from another teacher ({d.get('teacher')}); "
                        f"pass teacher={d.get('teacher')}")


def _lr_factor(cfg, stages):
    """The schedule restarted at each stage (warm-up and decay within it), as the papers' separate
    stage runs have; distill.restart_schedule=false: one schedule over the whole budget."""
    from lmtk.distill.stages import stage_at
    from lmtk.train.schedule import lr_factor

    if not cfg.distill.restart_schedule:
        return None
    return lambda frac: lr_factor(cfg.schedule, stage_at(stages, frac)[1])


def _train(cfg, rundir, teacher, student, objective, tok, data, dev, dtype, ckpt, dist, data_meta, meta, info) -> dict:
    from lmtk.data.packing import Batches
    from lmtk.eval.lm import val_seed, validate
    from lmtk.objectives import CLM

    sinks = make_sinks(cfg, rundir, rundir.name) if rundir is not None else null_sinks()
    val_objectives = {"clm": CLM(cfg.objective, tok)}
    train_data = Batches(data.train, cfg.data.seq_len, cfg.seed)
    val_data = Batches(data.val, cfg.data.seq_len, cfg.seed, nbytes=data.val_bytes)
    trainable, total = peft.count(student)
    teacher_val = {}
    if rundir is not None:
        mixers = "".join("A" if m == "attention" else "R" for m in student.cfg.layer_mixers())
        sinks.console.message(
            f"[bold]{cfg.run.name}[/bold]: teacher {teacher.describe()} -> {student.cfg.mixer['name']} student ({mixers}) | "
            f"init {meta['init']} | stages {', '.join(f'{s} {f:g}' for s, f in objective.stages)} | "
            f"{data.meta['train_tokens']:,} train tokens | {rundir.path}")
        sinks.console.message(peft.describe(student, info) if info["method"] != "full" else
                              f"trainable parameters: {trainable:,} of {total:,} ({meta['copied']} tensors copied from the teacher)")
        # the teacher's numbers on the same validation windows, once: the line the student is measured against
        tv = validate(teacher.lm, val_objectives, val_data, main="clm", tokens=cfg.val.tokens, batch_size=cfg.train.micro_batch_size,
                      device=dev, dtype=dtype, seed=val_seed(cfg))
        teacher_val = {"teacher/" + k[4:]: v for k, v in tv.items()}
        sinks.log(teacher_val, 0)
        sinks.console.message("teacher: " + "  ".join(f"val/{k[8:]} {teacher_val[k]:.4f}" for k in ("teacher/loss", "teacher/bpb")
                                                          if k in teacher_val))
    def validate_beside_teacher(model) -> dict:
        """The student's validation (the one path `lmtk eval suite=ppl` takes too), the teacher's loss beside it."""
        out = validate(model, val_objectives, val_data, main="clm", tokens=cfg.val.tokens, batch_size=cfg.train.micro_batch_size,
                       device=dev, dtype=dtype, seed=val_seed(cfg))
        return {**out, **({"val/teacher_loss": teacher_val["teacher/loss"]} if "teacher/loss" in teacher_val else {})}

    job = Job(
        cfg=cfg, model=student, objective=objective, train_data=train_data, val_data=val_data, val_objectives=val_objectives,
        run=rundir, sinks=sinks, device=dev, dtype=dtype, model_meta=student.cfg.to_dict(), resume_from=ckpt, dist=dist,
        tokenizer_json=tok.to_json(), data_meta=data_meta, meta={"distill": meta}, lr_factor=_lr_factor(cfg, objective.stages),
        validate=validate_beside_teacher,
    )
    try:
        summary = fit(job)
    finally:
        sinks.close()
    if rundir is None:
        return summary
    uni_loss, uni_bpb = data.unigram(cfg.val.tokens)
    summary.update(teacher_val, params=total, trainable_params=trainable, unigram_loss=uni_loss, unigram_bpb=uni_bpb,
                   init=meta["init"], stages=meta["stages"])
    if "val/loss" in summary and "teacher/loss" in teacher_val:
        summary["gap_recovered"] = (uni_loss - summary["val/loss"]) / max(1e-9, uni_loss - teacher_val["teacher/loss"])
    print_summary(rundir.name, summary)
    return summary


def print_summary(name: str, s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {name}", show_header=False)
    rows = [("steps", f"{s['steps']:,}"), ("tokens seen", f"{s['tokens']:,}"), ("train time", f"{s['train_seconds']:.1f} s"),
            ("init / stages", f"{s['init']} / {', '.join(f'{a} {b:g}' for a, b in s['stages'])}")]
    for key, label in (("val/loss", "student val loss"), ("teacher/loss", "teacher val loss"), ("unigram_loss", "unigram val loss"),
                       ("val/bpb", "student val bits/byte"), ("teacher/bpb", "teacher val bits/byte")):
        if key in s:
            rows.append((label, f"{s[key]:.4f}"))
    if "gap_recovered" in s:
        rows.append(("teacher's gain over unigram recovered", f"{100 * s['gap_recovered']:.1f}%"))
    for r in rows:
        t.add_row(*r)
    console.print(t)
