"""`lmtk search RECIPE model.d_model=[64,128] model/mixer=[attention,gla] ...`: training-free ranking.

Serianni & Kalita, "Training-free Neural Architecture Search for RNNs and Transformers" (ACL 2023):
a candidate's hidden states at initialisation, on one minibatch of real text, predict how well it
trains. Their *hidden covariance* score takes the correlation matrix R of a layer's hidden units
over the minibatch's tokens and scores its eigenvalues l_j

    score = -sum_j [ log(l_j + k) + 1 / (l_j + k) ],  k = 1e-5.

Each term is largest (-1) at l = 1, so R = I (units uncorrelated: each carries its own
information) scores highest, and the more the units repeat one another the lower it goes (the
near-zero eigenvalues of redundant directions cost ~1/k each). Higher predicts a lower loss.

Here every candidate is an ordinary config: the grid's overrides expanded (a cartesian product in
the order given), each combination composed and validated by lmtk.config.compose like any `lmtk
train` line, built exactly as the training run would build it (same seed, same first batches of
the recipe's own token cache), and scored on the final hidden states (what the LM head reads).
The sum runs over the D units, so its best value is -D; the table divides by D so that widths
compare (the paper's candidates all had one width). `search.train_steps=N` then trains the top
`search.top` candidates (or all) through `lmtk train`'s path, as runs <search>-<i>, and reports the
Kendall tau between the score's ranking and the trained validation losses' (and, as the trivial
baseline, the parameter count's). The search itself is a run of kind `search`: search.json holds
the table.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import torch
from omegaconf import OmegaConf

from lmtk.errors import UserError, suggest

EPS = 1e-5  # the paper's k: a zero eigenvalue costs 1/k instead of infinity
RECORD = "search.json"
# composing a candidate to score it: any budget passes validation (training sets budget.steps=search.train_steps)
BUDGET = ["budget.steps=1", "budget.tokens=null", "budget.hours=null", "budget.epochs=null"]


# ---- the score -----------------------------------------------------------------------------------


def hidden_covariance(h: torch.Tensor, k: float = EPS) -> float:
    """The hidden-covariance score of hidden states h [N, D] (N observations, D units): the
    eigenvalues of the units' correlation matrix over the observations, -sum(log(l + k) + 1/(l + k)).
    At most -D (uncorrelated units). A constant unit has a zero row in R (eigenvalue 0: it adds
    nothing), not a NaN."""
    h = h.detach().double()
    rms = h.square().mean(0).sqrt()
    h = h - h.mean(0)
    c = h.T @ h
    sd = c.diagonal().sqrt()
    r = c / (sd[:, None] * sd[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    dead = sd <= 1e-6 * rms * len(h) ** 0.5  # constant up to rounding: its "correlations" would be rounding noise
    r[dead], r[:, dead] = 0, 0
    lam = torch.linalg.eigvalsh(r).clamp_min(0)  # R is positive semi-definite; rounding can dip below 0
    return float(-(torch.log(lam + k) + 1 / (lam + k)).sum())


@torch.no_grad()
def score_model(model, batches: list[torch.Tensor], causal: bool = True) -> dict:
    """Scores of a model at initialisation on token batches [B, T]: `score`, the final hidden states'
    hidden covariance per unit (/ D: comparable across widths), `score_sum` (the paper's sum), and
    `layers`, each block's output's score per unit (for analysis)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    final, blocks = [], []
    for x in batches:
        trace: list[dict] = []
        h = model.hidden(x.to(dev), causal=causal, trace=trace)
        final.append(h.flatten(0, 1).float().cpu())
        blocks.append([t["block_out"].flatten(0, 1).float().cpu() for t in trace])
    model.train(was)
    d = final[0].shape[1]
    total = hidden_covariance(torch.cat(final))
    layers = [hidden_covariance(torch.cat([b[i] for b in blocks])) / d for i in range(len(blocks[0]))]
    return {"score": total / d, "score_sum": total, "layers": layers, "tokens": sum(int(x.numel()) for x in batches)}


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two equally long sequences (ties in either counted as tau-b does);
    None when fewer than two pairs can be ranked."""
    conc = disc = only_x = only_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx = (x[i] > x[j]) - (x[i] < x[j])
        dy = (y[i] > y[j]) - (y[i] < y[j])
        if dx and dy:
            conc, disc = conc + (dx == dy), disc + (dx != dy)
        elif dx:
            only_x += 1  # tied in y only
        elif dy:
            only_y += 1
    denom = math.sqrt((conc + disc + only_x) * (conc + disc + only_y))
    return (conc - disc) / denom if denom else None


# ---- the grid ------------------------------------------------------------------------------------


def split_list(value: str) -> list[str] | None:
    """'[a,b,[c,d]]' -> ['a', 'b', '[c,d]']: a bracketed value's items at its top level (brackets,
    braces and quotes nest), each as written; None for a value that is not a bracketed list."""
    v = value.strip()
    if not (v.startswith("[") and v.endswith("]")):
        return None
    items, depth, quote, cur = [], 0, None, ""
    for ch in v[1:-1]:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip() or items:
        items.append(cur.strip())
    return items


def _list_typed(key: str) -> bool:
    """Whether a config key's schema type is a list (optim.betas, peft.targets, ...): such a key's
    grid is a list of lists. Keys of the user's own (+key) and unknown ones: not list-typed."""
    from lmtk.schema import Config

    typ = Config
    for part in key.split("."):
        try:
            hints = get_type_hints(typ)
        except (TypeError, NameError):  # not a dataclass (Any, a plain type): nothing below it is typed
            return False
        if part not in hints:
            return False
        typ = hints[part]
        args = [a for a in get_args(typ) if a is not type(None)]
        if get_origin(typ) is not None and len(args) == 1 and get_origin(typ) is not list:
            typ = args[0]  # Optional[X] -> X
    return get_origin(typ) is list


def _is_group(key: str) -> bool:
    from lmtk.config import groups

    return "/" in key or key in groups()


@dataclass
class Axis:
    key: str
    values: list[str]


@dataclass
class Candidate:
    index: int  # 1-based, in grid order: the trained run is <search>-<index>
    choices: list[tuple[str, str]]  # (key, value) of each axis
    overrides: list[str]  # the whole override list of this candidate (shared ones and its choices)
    cfg: object = None
    error: str | None = None
    result: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.choices)


def parse_grid(overrides: list[str]) -> tuple[list, list[Axis]]:
    """The override list with each grid override replaced by its Axis (a bracketed value on a key
    that is not list-typed, or a list of lists on one that is; group=[a,b] is always a grid), and
    the axes in order."""
    slots, axes = [], []
    for o in overrides:
        if "=" not in o:
            raise UserError(f"override '{o}' is not key=value (e.g. model.d_model=[64,128])")
        key, value = o.split("=", 1)
        items = split_list(value)
        bare = key.lstrip("+~")
        if items is None and "," in value and not value.strip().startswith(("'", '"', "{")):
            raise UserError(f"{o}: a grid's values go in brackets, {key}=[{value}] (Hydra reads a,b as a sweep, which lmtk does not run)")
        if items is not None and (_is_group(bare) or not _list_typed(bare)
                                  or all(split_list(i) is not None for i in items) and items):
            if not items:
                raise UserError(f"{key}=[] gives the grid no value; list at least one, e.g. {key}=[a,b]")
            if bare.split(".")[0] in ("search", "run"):
                raise UserError(f"{key}={value}: {bare.split('.')[0]}.* sets the search itself, not a candidate; give it one value")
            axis = Axis(key, items)
            slots.append(axis)
            axes.append(axis)
        else:
            slots.append(o)
    return slots, axes


def expand(slots: list, axes: list[Axis]) -> list[Candidate]:
    """The cartesian product of the axes (the first axis varies slowest), one Candidate each."""
    out = []
    for i, combo in enumerate(itertools.product(*(a.values for a in axes)), 1):
        chosen = dict(zip((id(a) for a in axes), combo))
        overrides = [f"{s.key}={chosen[id(s)]}" if isinstance(s, Axis) else s for s in slots]
        out.append(Candidate(i, [(a.key, v) for a, v in zip(axes, combo)], overrides))
    return out


def _check_axis_keys(base, axes: list[Axis]) -> None:
    """A key no candidate can have (a typo) fails the search at once; mixer knobs (model.mixer.*)
    depend on each candidate's mixer and are checked per candidate."""
    from lmtk.config import _flat_keys

    keys = set(_flat_keys(OmegaConf.to_container(base, resolve=False)))
    for a in axes:
        if a.key.startswith(("+", "~")) or _is_group(a.key) or a.key.startswith("model.mixer."):
            continue
        if a.key not in keys:
            raise UserError(f"unknown config key '{a.key}'{suggest(a.key, sorted(keys))}")


# ---- the command ---------------------------------------------------------------------------------


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def run(recipe: str, overrides: list[str]) -> dict:
    """`lmtk search`: compose, score and (search.train_steps) train the candidates; returns the
    record written to <runs>/<search>/search.json."""
    from rich.markup import escape

    from lmtk import device as devices
    from lmtk.config import compose
    from lmtk.log import console
    from lmtk.runs import RunDir, runs_root

    slots, axes = parse_grid(overrides)
    if not axes:
        raise UserError("lmtk search needs a grid: give at least one override a list of values, "
                        "e.g. model.d_model=[64,128] or model/mixer=[attention,gla]")
    fixed = [s for s in slots if not isinstance(s, Axis)]
    # the shared overrides and search.* (a mistake here spoils every candidate); a candidate's budget is
    # search.train_steps, so the recipe's (or a budget.* override) is replaced rather than required
    base = compose(recipe, fixed + BUDGET)
    _check_axis_keys(base, axes)
    s = base.search
    OmegaConf.update(base, "budget.steps", s.train_steps or None)  # what the search's config.yaml records
    cands = expand(slots, axes)
    if len(cands) > s.max_candidates:
        raise UserError(f"the grid has {len(cands)} candidates ({' x '.join(str(len(a.values)) for a in axes)}), more than "
                        f"search.max_candidates={s.max_candidates}; narrow it, or raise search.max_candidates")
    if base.launcher.nproc > 1:
        raise UserError("lmtk search runs in one process; drop launcher.nproc (each candidate it trains is an ordinary run)")
    for c in cands:
        try:
            c.cfg = compose(recipe, c.overrides + BUDGET)
        except UserError as err:
            c.error = _first_line(err)
    valid = [c for c in cands if c.error is None]
    if not valid:
        raise UserError(f"no candidate of the grid is valid; candidate 1 ({cands[0].label}): {cands[0].error}")

    root = runs_root(base.run.root)
    name = base.run.name or f"search-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    dev, _ = devices.resolve(base.device, base.precision)
    rundir, _ = RunDir.prepare(root, name, resume=False, overwrite=base.run.overwrite)
    with rundir.recording():
        from lmtk.checkpoint import write_atomic

        write_atomic(rundir.file("overrides.yaml"), OmegaConf.to_yaml(OmegaConf.create({"recipe": recipe, "overrides": list(overrides)})))
        write_atomic(rundir.file("config.yaml"), OmegaConf.to_yaml(base, resolve=True))
        rundir.start(kind="search", recipe=recipe, device=str(dev), resumed=False)
        record = {"name": name, "recipe": recipe, "overrides": fixed, "axes": {a.key: a.values for a in axes},
                  "score": "hidden covariance per unit (Serianni & Kalita 2023), final hidden states at initialisation",
                  "batches": s.batches, "train_steps": s.train_steps, "top": s.top, "candidates": []}
        console.print(f"[bold]{escape(name)}[/bold]: {len(cands)} candidates ({len(valid)} valid) from {recipe} | "
                      f"scoring {s.batches} batch{'es' * (s.batches != 1)} each | {dev}")
        data: dict = {}
        for c in valid:
            _score(c, root, dev, data)
        scored = sorted((c for c in cands if "score" in c.result), key=lambda c: -c.result["score"])
        for rank, c in enumerate(scored, 1):
            c.result["rank"] = rank
        record["candidates"] = [_row(c) for c in cands]
        write_atomic(rundir.file(RECORD), json.dumps(record, indent=2))  # the ranking stands before any training
        if s.train_steps:
            top = scored if s.top is None else scored[: s.top]
            for c in top:
                _train(c, recipe, name, s.train_steps, rundir.path)
            trained = [c for c in top if c.result.get("val_loss") is not None and math.isfinite(c.result["val_loss"])]
            record["kendall_tau"] = kendall_tau([c.result["score"] for c in trained], [-c.result["val_loss"] for c in trained])
            record["kendall_tau_params"] = kendall_tau([c.result["params"] for c in trained], [-c.result["val_loss"] for c in trained])
            record["trained"] = len(trained)
            for rank, c in enumerate(sorted(trained, key=lambda c: c.result["val_loss"]), 1):
                c.result["trained_rank"] = rank
        record["candidates"] = [_row(c) for c in cands]
        write_atomic(rundir.file(RECORD), json.dumps(record, indent=2))
        best = scored[0] if scored else None
        rundir.finish("done", summary={
            "candidates": len(cands), "scored": len(scored), "best": best.label if best else None,
            "best_score": best.result["score"] if best else None, "runs": [c.result["run"] for c in cands if c.result.get("run")],
            **{k: record[k] for k in ("trained", "kendall_tau", "kendall_tau_params") if k in record}})
    return record


def _row(c: Candidate) -> dict:
    return {"index": c.index, "candidate": c.label, "choices": dict(c.choices), "overrides": c.overrides,
            **({"error": c.error} if c.error else {}), **c.result}


def _score(c: Candidate, root, dev, data: dict) -> None:
    """Build the candidate as `lmtk train` would (its checks, its seed, its token cache) and score
    it on its first search.batches training batches; a refusal becomes the candidate's error."""
    from lmtk.data.packing import Batches
    from lmtk.models import build_model, model_config
    from lmtk.objectives import ENCODER_OBJECTIVES, build_objective
    from lmtk.train.pretrain import (
        _check_mixer_reads_both_ways,
        prepare_data,
        refuse_finetune_settings,
    )

    cfg = c.cfg
    try:
        refuse_finetune_settings(cfg)
        key = OmegaConf.to_yaml(OmegaConf.create({"data": cfg.data, "tokenizer": cfg.tokenizer}), resolve=True)
        if key not in data:  # candidates with the same data and tokenizer share one cache (and lmtk train's on disk)
            data[key] = prepare_data(cfg, root)
        tok, cache = data[key]
        t0 = time.perf_counter()  # the score's own cost: build and forward, not the data's preparation
        mcfg = model_config(cfg.model, tok.vocab_size)
        OmegaConf.update(cfg, "model.vocab_size", mcfg.vocab_size)
        _check_mixer_reads_both_ways(cfg, mcfg)
        build_objective(cfg.objective, tok)
        torch.manual_seed(cfg.seed)  # the very model the candidate's training run starts from
        model = build_model(mcfg).to(dev)
        b = cfg.train.micro_batch_size
        train = Batches(cache.train, cfg.data.seq_len, cfg.seed)
        batches = [train.get(i * b, b) for i in range(cfg.search.batches)]
        causal = cfg.objective.name not in ENCODER_OBJECTIVES  # the reading it trains (the hybrids train the causal one too)
        c.result.update(params=model.num_params(), **score_model(model, batches, causal))
    except UserError as err:
        c.error = _first_line(err)
        return
    c.result["seconds"] = round(time.perf_counter() - t0, 3)
    del model


def _train(c: Candidate, recipe: str, search: str, steps: int, search_path) -> None:
    """The candidate trained for `steps` steps as run <search>-<index>, by lmtk train's own path."""
    from lmtk.config import compose
    from lmtk.train import pretrain

    name = f"{search}-{c.index}"
    extra = [f"budget.steps={steps}", *BUDGET[1:], f"run.name={name}"]
    overrides = [o for o in c.overrides if not o.lstrip("+~").startswith(("search.", "budget.", "run.name="))] + extra
    try:
        cfg = compose(recipe, overrides)
        summary = pretrain.run(cfg, recipe, overrides, parents={"search": str(search_path)})
    except UserError as err:  # one candidate's failure (a diverged lr, say) leaves the others to train
        c.error = f"training: {_first_line(err)}"
        if (Path(search_path).parent / name).is_dir():
            c.result["run"] = name
        return
    c.result.update(run=name, val_loss=summary.get("val/loss"), val_bpb=summary.get("val/bpb"))


def render(record: dict, console) -> None:
    """The ranked table (rich): rank, candidate, params, score, seconds; after training, each one's
    val loss and trained rank; then the Kendall taus."""
    from rich.markup import escape
    from rich.table import Table

    rows = record["candidates"]
    trained = "train_steps" in record and record["train_steps"]
    tokens = next((r["tokens"] for r in rows if "tokens" in r), 0)
    t = Table(title=f"search {escape(record['name'])}: hidden-covariance score at initialisation on {tokens:,} tokens "
                    f"(per unit, at most -1; higher: predicted to train better)")
    for col in ("rank", "candidate", "params", "score", "seconds"):
        t.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=col != "candidate")
    if trained:
        t.add_column(f"val loss @{record['train_steps']}", justify="right")
        t.add_column("trained rank", justify="right")
    if any("error" in r for r in rows):
        t.add_column("note", overflow="fold")
    for r in sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["index"])):
        cells = [str(r.get("rank", "-")), escape(r["candidate"]), f"{r['params']:,}" if "params" in r else "-",
                 f"{r['score']:.4f}" if "score" in r else "-", f"{r['seconds']:.2f}" if "seconds" in r else "-"]
        if trained:
            cells += [f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-", str(r.get("trained_rank", "-"))]
        if any("error" in x for x in rows):
            cells.append(escape(r.get("error", "")))
        t.add_row(*cells)
    console.print(t)
    if trained:
        tau, base = record.get("kendall_tau"), record.get("kendall_tau_params")
        tau, base = ("n/a" if v is None else f"{v:+.3f}" for v in (tau, base))
        console.print(f"Kendall tau, score vs val loss over {record.get('trained', 0)} trained candidates: {tau} "
                      f"(ranking by parameter count: {base}; +1: the same order, -1: reversed)")
    console.print(f"record: {record['name']}/{RECORD}  (lmtk runs lists it; lmtk runs compare "
                  f"{' '.join(r['run'] for r in rows if r.get('run')) or '<runs>'})" if trained else
                  f"record: {record['name']}/{RECORD}; train the best briefly with search.train_steps=N (search.top=K)")
