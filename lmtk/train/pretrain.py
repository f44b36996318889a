"""`lmtk train`: config -> data -> tokenizer -> token cache -> model -> the loop -> run directory."""

from __future__ import annotations

import datetime as _dt
import time

import torch
from omegaconf import OmegaConf

from lmtk.data.packing import Batches, TokenCache
from lmtk.data.sources import Source
from lmtk.data.tokenizer import copy_tokenizer, get_tokenizer
from lmtk.eval.lm import readings
from lmtk.errors import UserError
from lmtk.log import console, make_sinks, null_sinks
from lmtk.models import build_model, model_config
from lmtk.objectives import build_objective
from lmtk.runs import RunDir, runs_root
from lmtk.train import resume
from lmtk.train.loop import Job, fit


def _run_name(cfg) -> str:
    return cfg.run.name or f"{cfg.recipe}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def prepare_data(cfg, root):
    """Source, tokenizer and token cache; all before any run directory is touched."""
    t0 = time.perf_counter()
    source = Source(cfg.data)
    tok, trained = get_tokenizer(cfg.tokenizer, source, root)
    if trained:
        console.print(f"trained {cfg.tokenizer.kind} tokenizer ({tok.vocab_size} tokens) in {time.perf_counter() - t0:.1f}s")
    t1 = time.perf_counter()
    cache = TokenCache(source, tok, cfg.data.seq_len)
    if not cache.hit:
        mb = cache.meta["train_chars"] / 1e6
        console.print(f"tokenised {mb:.1f} MB into {cache.meta['train_tokens']:,} tokens in {time.perf_counter() - t1:.1f}s")
    return tok, cache


def check_parallel(cfg, world: int, dtype) -> str | None:
    """The batch and precision settings against `world` ranks (also checked before `launcher.nproc`
    starts any process). A global batch that gives each rank less than one micro-batch lowers
    train.micro_batch_size to what each rank gets (returned as a note); other mismatches are errors."""
    tc, note = cfg.train, None
    if world > 1 and cfg.launcher.strategy == "fsdp" and dtype == torch.float16:
        # The GradScaler would find non-finite gradients per shard, so ranks could disagree on skipping a step.
        raise UserError("precision=fp16 does not work with launcher.strategy=fsdp; use precision=bf16 (or fp32)")
    if world > 1 and tc.batch_size % world == 0 and tc.micro_batch_size * world > tc.batch_size:
        note = (f"train.micro_batch_size {tc.micro_batch_size} -> {tc.batch_size // world}: "
                f"train.batch_size={tc.batch_size} is global, split over {world} ranks")
        tc.micro_batch_size = tc.batch_size // world
    if tc.batch_size % (tc.micro_batch_size * world):
        raise UserError(
            f"train.batch_size={tc.batch_size} is not a multiple of train.micro_batch_size x ranks "
            f"({tc.micro_batch_size} x {world})"
        )
    return note


# fp32 matmul throughput of one CPU thread, measured on the project's 2-core machine (~70 GFLOP/s
# for both); training steps of large models run near it, small ones below it (bench/RESULTS.md).
CPU_GFLOPS_PER_THREAD = 35.0
# the note fires for a run of at least this many seconds that sees fewer tokens than the model
# has (non-embedding) parameters: far too little for that model to learn much
NOTE_MIN_SECONDS = 600


def cpu_budget_note(cfg, dev: torch.device) -> str | None:
    """One line for a GPU-sized run started on a CPU (e.g. `lmtk train cramming-bert` on a
    laptop): the expected tokens/s here (the model's training FLOPs per token against the CPU's
    matmul rate), what the budget buys and how to shrink it. None when the run fits a CPU.
    Decided from the config alone: the model is built on the meta device (no memory, no init)."""
    if dev.type != "cpu":
        return None
    from lmtk.models import LanguageModel, padded_vocab

    m = cfg.model
    try:
        mcfg = model_config(m, m.vocab_size or padded_vocab(cfg.tokenizer.vocab_size))
    except UserError:
        return None  # a bad model config fails with its own message later
    with torch.device("meta"):
        model = LanguageModel(mcfg)
    head_fraction = {"mlm": cfg.objective.mask_rate, "mtp": cfg.objective.mtp_k}.get(cfg.objective.name, 1.0)
    flops = model.flops_per_token(cfg.data.seq_len, head_fraction)
    rate = CPU_GFLOPS_PER_THREAD * 1e9 * torch.get_num_threads()
    tok_s = rate / flops
    b = cfg.budget
    planned = [t for t in (
        b.steps * cfg.train.batch_size * cfg.data.seq_len if b.steps else None,
        b.tokens,
        b.hours * 3600 * tok_s if b.hours else None,
    ) if t]
    if not planned:  # an epoch budget alone: its size is known only after tokenising
        return None
    tokens = min(planned)
    seconds = tokens / tok_s
    params = model.num_params(embeddings=False)
    if seconds < NOTE_MIN_SECONDS or tokens >= params:
        return None
    took = "" if b.hours and tokens == planned[-1] else (
        f" in ~{seconds / 3600:.1f} h" if seconds >= 3600 else f" in ~{seconds / 60:.0f} min")
    return (
        f"note: {cfg.recipe} is sized for a GPU: its {params / 1e6:.0f}M-parameter model runs at ~{tok_s:,.0f} tok/s "
        f"on this CPU ({flops / 1e9:.2f} GFLOP/token at ~{rate / 1e9:.0f} GFLOP/s), so budget {_budget(cfg)} buys "
        f"~{tokens / 1e6:.1f}M tokens{took}, fewer than it has parameters; to train on a CPU shrink it, "
        f"e.g. model=small-gpt tokenizer.vocab_size=1024 budget.hours=0.05 (or budget.steps=N)"
    )


def refuse_finetune_settings(cfg) -> None:
    """base=, task= and peft= belong to `lmtk finetune`, teacher= to `lmtk distill`; `lmtk train` would ignore them."""
    for key, unset in (("base", None), ("task.source", "none"), ("peft.method", "full")):
        if OmegaConf.select(cfg, key) != unset:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} is a fine-tuning setting: use lmtk finetune (lmtk train pretrains)")
    if cfg.get("teacher") is not None:
        raise UserError(f"teacher={cfg.teacher} is a distillation setting: use lmtk distill (lmtk train pretrains)")


def run(cfg, recipe: str, overrides: list[str], parents: dict | None = None) -> dict:
    """`lmtk train`. `parents`: run.json's lineage of a run another command started (lmtk search's
    candidates name their search)."""
    from lmtk import dist as distributed

    refuse_finetune_settings(cfg)

    with distributed.session(cfg) as (dev, dtype, dist):
        cpu_note = cpu_budget_note(cfg, dev) if dist.main else None
        if cpu_note:
            console.print(cpu_note, markup=False, soft_wrap=True)
        return _run(cfg, recipe, overrides, dev, dtype, dist, parents)


def _run(cfg, recipe, overrides, dev, dtype, dist, parents=None) -> dict:
    root = runs_root(cfg.run.root)
    name = dist.broadcast(_run_name(cfg))  # a timestamped default name must be the same on every rank
    name, ckpt = resume.target(cfg, name)
    if not dist.main:
        dist.barrier()  # rank 0 trains the tokenizer and fills the cache; the others then read it
    tok, cache = prepare_data(cfg, root)
    if dist.main:
        dist.barrier()
    if ckpt is not None:
        resume.adopt_old_model_keys(ckpt, cfg)  # e.g. the rope layout of a run from before model.rope_layout
    mcfg = model_config(cfg.model, tok.vocab_size)

    OmegaConf.update(cfg, "run.name", name)
    OmegaConf.update(cfg, "model.vocab_size", mcfg.vocab_size)
    _check_mixer_reads_both_ways(cfg, mcfg)
    build_objective(cfg.objective, tok)  # refuses what the tokenizer lacks (a mask token) before any run directory
    data_meta = {"train_tokens": int(cache.meta["train_tokens"]), "val_tokens": int(cache.meta["val_tokens"])}
    # checks that refuse a resume before any run directory is created or changed
    same = ckpt is not None and resume.same_run(cfg, name, ckpt)
    ckpt_step, changes = resume.check(ckpt, cfg, mcfg.to_dict(), tok, data_meta, same) if ckpt is not None else (0, {})
    if ckpt is not None:  # an objective's own heads (mtp, rts) must be the checkpoint's
        from lmtk.checkpoint import check_objective_heads
        from lmtk.models import LanguageModel

        with torch.device("meta"):
            shape = LanguageModel(mcfg)
            build_objective(cfg.objective, tok).attach(shape)
        check_objective_heads(ckpt, shape)
    if not dist.main:  # only rank 0 writes the run directory
        return _train(cfg, None, tok, cache, mcfg, dev, dtype, ckpt, dist, data_meta)
    return RunDir.write_run(
        root, cfg, kind="train", recipe=recipe, overrides=overrides, device=_describe(dev, dtype, dist.world, dist.strategy),
        save_tokenizer=lambda path: copy_tokenizer(tok, path), model=mcfg.to_dict(), ckpt=ckpt, ckpt_step=ckpt_step,
        changes=changes, same=same, parents=parents, body=lambda rundir: _train(cfg, rundir, tok, cache, mcfg, dev, dtype, ckpt, dist, data_meta))


def _check_mixer_reads_both_ways(cfg, mcfg) -> None:
    from lmtk.models.mixers import causal_only
    from lmtk.objectives import objective_class

    if causal_only(mcfg) and objective_class(cfg.objective.name).bidirectional:
        raise UserError(f"objective={cfg.objective.name} trains a masked (bidirectional) reading, which model.mixer={mcfg.mixer['name']} "
                        "cannot give (it reads left to right); use objective=clm")


def _describe(dev: torch.device, dtype: torch.dtype, world: int = 1, strategy: str = "ddp") -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    ranks = f" x {world} ranks, {strategy}" if world > 1 else ""
    return f"{name}{ranks} ({str(dtype).replace('torch.', '')})"


def _train(cfg, rundir, tok, cache, mcfg, dev, dtype, ckpt, dist, data_meta) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    objective = build_objective(cfg.objective, tok)
    objective.attach(model)  # its own heads (mtp, rts), before the optimizer and a resume's weights
    train_data = Batches(cache.train, cfg.data.seq_len, cfg.seed)
    val_data = Batches(cache.val, cfg.data.seq_len, cfg.seed, nbytes=cache.val_bytes)
    sinks = make_sinks(cfg, rundir, rundir.name) if rundir is not None else null_sinks()
    n_params = model.num_params()
    n_active = model.num_params(active=True)  # an MoE's: the router and the top_k experts a token uses
    active = f" ({n_active / 1e6:.2f}M active)" if n_active != n_params else ""
    val_objectives, note = readings(objective, cfg.val.mask_rate, model)  # causal-only mixers: no masked reading
    if note:
        sinks.console.message(f"validation: {note}")
    if rundir is not None:
        sinks.console.message(
            f"[bold]{cfg.run.name}[/bold]: {cfg.recipe} | {n_params / 1e6:.2f}M params{active} | {objective.name} | "
            f"{cache.meta['train_tokens']:,} train tokens | budget {_budget(cfg)} | "
            f"{_describe(dev, dtype, dist.world, dist.strategy)} | {rundir.path}"
        )
    job = Job(
        cfg=cfg, model=model, objective=objective, train_data=train_data, val_data=val_data,
        val_objectives=val_objectives, run=rundir, sinks=sinks,
        device=dev, dtype=dtype, model_meta=mcfg.to_dict(), resume_from=ckpt, dist=dist,
        tokenizer_json=tok.to_json(), data_meta=data_meta,
    )
    try:
        summary = fit(job)
    finally:
        sinks.close()
    if rundir is None:
        return summary
    uni_loss, uni_bpb = cache.unigram(cfg.val.tokens)
    summary.update(params=n_params, unigram_loss=uni_loss, unigram_bpb=uni_bpb)
    print_summary(rundir.name, summary)
    return summary


def _budget(cfg) -> str:
    from lmtk.train.budget import Budget

    return Budget(cfg.budget, 1).describe()


def print_summary(name: str, s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {name}", show_header=False)
    rows = [
        ("steps", f"{s['steps']:,}"),
        ("tokens seen", f"{s['tokens']:,}"),
        ("tokens/s", f"{s['tok/s']:,.0f}"),
        ("train time", f"{s['train_seconds']:.1f} s"),
        ("peak memory", f"{s['peak_mem_gib']:.2f} GiB"),
        ("final train loss", f"{s['train_loss']:.4f}" if s.get("train_loss") is not None else "-"),
    ]
    for key, label in (("val/loss", "val loss"), ("val/bpb", "val bits/byte"), ("val/clm_loss", "val causal loss"), ("val/mlm_loss", "val masked loss")):
        if key in s:
            rows.append((label, f"{s[key]:.4f}"))
    if "unigram_bpb" in s:
        rows.append(("unigram bits/byte", f"{s['unigram_bpb']:.4f}"))
    if "mfu" in s:
        rows.append(("MFU", f"{100 * s['mfu']:.1f}%"))
    if s.get("skipped_steps"):
        rows.append(("skipped (non-finite) steps", str(s["skipped_steps"])))
    for r in rows:
        t.add_row(*r)
    console.print(t)
