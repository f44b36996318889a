"""`lmtk runs show RUN` and `lmtk runs compare A B ...`: what a run is, how it differs from its
recipe and from other runs, where it came from and what came of it.

Everything here reads the run directory (run.json, config.yaml, overrides.yaml, eval/) and
never writes it. The data functions (show_data, compare_data) return plain dicts (--json);
the render functions turn them into rich tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmtk.runs import RunDir, children, live_status, parent_label, ref_name

# keys every run differs in from its recipe and from other runs: not worth a row
_NOISE = ("run.name", "run.root", "description")


def flatten(d, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fmt_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def fmt_number(v) -> str:
    if isinstance(v, bool) or v is None:
        return fmt_value(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
        return f"{v:.3e}"
    return fmt_value(v)


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _run_config(run: RunDir) -> dict:
    try:
        return yaml.safe_load(run.file("config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _overrides(run: RunDir) -> list[str]:
    try:
        return list((yaml.safe_load(run.file("overrides.yaml").read_text()) or {}).get("overrides") or [])
    except (OSError, yaml.YAMLError):
        return []


def _override_for(key: str, overrides: list[str]) -> str | None:
    """The command-line override that set `key` (model.d_model=64, or a group: model/mixer=gla);
    the most specific one when several match (task.train=x over task=local)."""
    best, length = None, -1
    for o in overrides:
        dotted = o.split("=", 1)[0].lstrip("+~").replace("/", ".")
        if (key == dotted or key.startswith(dotted + ".")) and len(dotted) >= length:
            best, length = o, len(dotted)
    return best


def config_diff(run: RunDir, info: dict) -> tuple[list[dict], str | None]:
    """The run's config.yaml against its recipe composed with no overrides: one row per key that
    differs (key, recipe, run, why). `why`: the override that set it, the teacher's / base's
    architecture (distill / finetune take model.* from it), a resume's change, or lmtk itself
    (run.name's default, the vocabulary size from the tokenizer, ...). Returns (rows, note): the
    note says why there is no diff (a recipe that no longer composes)."""
    from omegaconf import OmegaConf

    from lmtk.config import compose
    from lmtk.errors import UserError

    recipe = info.get("recipe") or "default"
    try:
        composed = OmegaConf.to_container(compose(recipe, []), resolve=True)
    except UserError as err:
        return [], f"recipe '{recipe}' does not compose now ({err}); the overrides were: {' '.join(_overrides(run)) or 'none'}"
    mine = flatten(_run_config(run))
    theirs = flatten(composed)
    overrides = _overrides(run)
    resumed = set()
    for h in info.get("history") or []:
        resumed.update((h.get("changed") or {}).keys())
    origin = {"distill": "the teacher's architecture", "finetune": "the base's architecture"}.get(info.get("kind") or "")
    rows = []
    for key in sorted(set(mine) | set(theirs)):
        if key in _NOISE or mine.get(key, KeyError) == theirs.get(key, KeyError):
            continue
        o = _override_for(key, overrides)
        if o is not None:
            why = f"override {o}"
        elif key in resumed:
            why = "changed on resume"
        elif origin and key.startswith("model."):
            why = origin
        elif info.get("kind") == "distill" and key.startswith("data."):
            why = "the teacher's data"
        elif key == "model.vocab_size":
            why = "the tokenizer's"
        else:
            why = "set by lmtk"
        rows.append({"key": key, "recipe": fmt_value(theirs[key]) if key in theirs else "-",
                     "run": fmt_value(mine[key]) if key in mine else "-", "why": why})
    return rows, None


def _evals(run_path: Path) -> dict:
    from lmtk.eval.results import headline, read

    out = {}
    for suite, d in read(run_path / "eval").items():
        h = headline(d)
        out[suite] = {"headline": h[0] if h else None, "value": h[1] if h else None, "step": d.get("step"),
                      "scores": d.get("scores") or {}, "created": d.get("created")}
    return out


def show_data(root, name: str) -> dict:
    run = RunDir.open(root, name)
    info = run.info()
    rows, note = config_diff(run, info)
    parents = [{"role": role, "run": ref_name(ref, root), "path": str(ref)} for role, ref in (info.get("parents") or {}).items() if ref]
    return {
        "name": run.name, "path": str(run.path), "kind": info.get("kind"), "recipe": info.get("recipe"),
        "status": live_status(run.path, info), "created": info.get("created"), "updated": info.get("updated"),
        "device": info.get("device"), "command": info.get("command"), "error": info.get("error"),
        "resumed": info.get("resumed", 0), "parents": parents,
        "children": [{"run": n, "role": role, "kind": kind} for n, role, kind in children(root, run.path)],
        "summary": info.get("summary") or {}, "eval": _evals(run.path),
        "config_diff": rows, "config_note": note, "overrides": _overrides(run),
    }


def _table(title: str, *cols, **kw):
    from rich.table import Table

    t = Table(title=title, title_justify="left", **kw)
    for c in cols:
        t.add_column(c, overflow="fold")
    return t


def render_show(d: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    head = Table(show_header=False, box=None, title=f"run {d['name']}", title_justify="left", title_style="bold")
    head.add_column(style="dim")
    head.add_column(overflow="fold")
    for label, value in (("path", d["path"]), ("kind", d["kind"]), ("recipe", d["recipe"]), ("status", d["status"]),
                         ("error", d["error"]), ("created", d["created"]), ("updated", d["updated"]), ("device", d["device"]),
                         ("command", d["command"]), ("resumed", d["resumed"] or None)):
        if value is not None:
            head.add_row(label, escape(str(value)))  # a command's model/mixer=[a,b] is not rich markup
    console.print(head)

    lineage = _table("lineage", "relation", "run", "path / kind")
    for p in d["parents"]:
        lineage.add_row(f"parent ({p['role']})", p["run"], p["path"])
    for c in d["children"]:
        lineage.add_row(f"child (its {c['role']})", c["run"], c["kind"])
    if not d["parents"] and not d["children"]:
        lineage.add_row("-", "trained from scratch, no runs start from it", "")
    console.print(lineage)

    summary = _table("metrics summary (run.json)", "metric", "value")
    for k, v in d["summary"].items():
        if k == "epochs" and isinstance(v, list):  # lmtk finetune: the task's score after each epoch
            v = "; ".join(f"epoch {e.get('epoch')}: {fmt_number(e.get('score'))}" for e in v if isinstance(e, dict))
        summary.add_row(k, fmt_seconds(v) if k == "train_seconds" else fmt_number(v))
    if not d["summary"]:
        summary.add_row("-", "no summary: the run has not finished" if d["status"] != "done" else "-")
    console.print(summary)

    ev = _table("eval results (eval/<suite>.json)", "suite", "headline", "step", "other scores")
    for suite, e in d["eval"].items():
        others = ", ".join(f"{k}={fmt_number(v)}" for k, v in list(e["scores"].items())[1:7])
        ev.add_row(suite, f"{e['headline']}={fmt_number(e['value'])}" if e["headline"] else "-", fmt_value(e["step"]), others or "-")
    if not d["eval"]:
        ev.add_row("-", f"none yet: lmtk eval {d['name']}", "", "")
    console.print(ev)

    diff = _table(f"config against recipe '{d['recipe']}' (composed with no overrides)", "key", "recipe", "this run", "why")
    for r in d["config_diff"]:
        diff.add_row(r["key"], r["recipe"], r["run"], r["why"])
    if d["config_note"]:
        diff.add_row("-", "", "", d["config_note"])
    elif not d["config_diff"]:
        diff.add_row("-", "", "", "the recipe's config unchanged")
    console.print(diff)


# rows of `runs compare`: (label, summary key or callable of the run's data)
def compare_data(root, names: list[str]) -> dict:
    from lmtk.errors import UserError

    if len(names) < 2:
        raise UserError("lmtk runs compare needs at least two runs: lmtk runs compare A B [C ...]")
    runs = [RunDir.open(root, n) for n in names]
    out = []
    configs = []
    for run in runs:
        info = run.info()
        s = info.get("summary") or {}
        last = {}
        if not s:  # unfinished: progress from metrics.jsonl
            for m in run.metrics():
                last.update({k: v for k, v in m.items() if k in ("step", "tokens", "val/loss", "val/bpb")})
        out.append({
            "name": run.name, "path": str(run.path), "kind": info.get("kind"), "recipe": info.get("recipe"),
            "status": live_status(run.path, info), "parent": parent_label(info, root),
            "steps": s.get("steps", last.get("step")), "tokens": s.get("tokens", last.get("tokens")),
            "params": s.get("params"), "train_seconds": s.get("train_seconds"), "tok/s": s.get("tok/s"),
            "train_loss": s.get("train_loss"), "val_loss": s.get("val/loss", last.get("val/loss")),
            "val_bpb": s.get("val/bpb", last.get("val/bpb")),
            "eval": {suite: {"headline": e["headline"], "value": e["value"]} for suite, e in _evals(run.path).items()},
        })
        configs.append(flatten(_run_config(run)))
    keys = sorted(set().union(*configs))
    differ = [k for k in keys if k not in _NOISE and len({fmt_value(c.get(k, "-")) if k in c else "-" for c in configs}) > 1]
    return {"runs": out, "config_diff": [{"key": k, "values": [fmt_value(c[k]) if k in c else "-" for c in configs]} for k in differ]}


MAX_CONFIG_ROWS = 40


def render_compare(d: dict, console) -> None:
    from rich.table import Table

    runs = d["runs"]
    t = Table(title="runs side by side", title_justify="left")
    t.add_column("", style="dim", no_wrap=True)
    for r in runs:
        t.add_column(r["name"], overflow="fold")

    def best(key):  # the lowest value of a loss: bold
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        return min(vals) if len(vals) > 1 else None

    def row(label, cells):
        t.add_row(label, *cells)

    row("kind", [str(r["kind"]) for r in runs])
    row("recipe", [str(r["recipe"]) for r in runs])
    row("status", [str(r["status"]) for r in runs])
    row("parent", [r["parent"] or "-" for r in runs])
    row("steps", [fmt_number(r["steps"]) if r["steps"] is not None else "-" for r in runs])
    row("tokens", [fmt_number(r["tokens"]) if r["tokens"] is not None else "-" for r in runs])
    row("params", [fmt_number(r["params"]) if r["params"] is not None else "-" for r in runs])
    row("train time", [fmt_seconds(r["train_seconds"]) for r in runs])
    row("tok/s", [f"{r['tok/s']:,.0f}" if r["tok/s"] is not None else "-" for r in runs])
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss"), ("val_bpb", "val bpb")):
        b = best(key) if key != "train_loss" else None
        row(label, [("[bold]" if r[key] == b else "") + (f"{r[key]:.4f}" if r[key] is not None else "-") for r in runs])
    suites = sorted(set().union(*(r["eval"] for r in runs)))
    for suite in suites:
        row(f"eval {suite}", [f"{e['headline']}={fmt_number(e['value'])}" if (e := r["eval"].get(suite)) and e["headline"] else "-"
                              for r in runs])
    diffs = d["config_diff"]
    if diffs:
        t.add_section()
        for item in diffs[:MAX_CONFIG_ROWS]:
            row(item["key"], item["values"])
        if len(diffs) > MAX_CONFIG_ROWS:
            row(f"... {len(diffs) - MAX_CONFIG_ROWS} more config keys differ", ["" for _ in runs])
    else:
        t.add_section()
        row("config", ["the same" for _ in runs])
    console.print(t)
