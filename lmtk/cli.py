"""The `lmtk` command: parse, compose, dispatch. No training logic lives here."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import List, Optional

import typer

from lmtk.errors import UserError

app = typer.Typer(
    help="lmtk: train small language models on one GPU (or a laptop).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ARGS_HELP = "[RECIPE] [key=value ...]: a recipe name (default: 'default') and Hydra overrides (key=value, group=option, +new.key=value)"


def _complete_recipe_args(ctx: typer.Context, incomplete: str) -> list[str]:
    from lmtk.completion import complete_recipe_args

    return complete_recipe_args(ctx, incomplete)


def _complete_eval_args(ctx: typer.Context, incomplete: str) -> list[str]:
    from lmtk.completion import complete_eval_args

    return complete_eval_args(ctx, incomplete)


def _complete_runs(ctx: typer.Context, incomplete: str) -> list[str]:
    from lmtk.completion import complete_runs

    return complete_runs(ctx, incomplete)


def _split(args: Optional[List[str]]) -> tuple[str, list[str]]:
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return "default", args


def _launch_or_run(command: str, args, run) -> None:
    """`lmtk COMMAND [RECIPE] [OVERRIDES]`: the recipe (train's default is `default`; finetune's and
    distill's their own) checked against the command, composed, and run(cfg, recipe, overrides) here,
    or under launcher.nproc=N: N ranks started by lmtk.launch (bad settings fail here with one line,
    not once per rank)."""
    from lmtk.config import check_recipe_command, compose

    recipe, overrides = _split(args)
    if recipe == "default" and command != "train":
        recipe = command
    check_recipe_command(recipe, command)
    cfg = compose(recipe, overrides)
    if cfg.launcher.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from lmtk import device as devices
        from lmtk.launch import launch
        from lmtk.train.pretrain import check_parallel

        check_parallel(cfg.copy(), cfg.launcher.nproc, devices.resolve(cfg.device, cfg.precision, cfg.launcher.strategy)[1])
        rest = [o for o in overrides if not o.startswith("launcher.nproc=")]
        raise typer.Exit(launch(cfg.launcher.nproc, [command, recipe, *rest]))
    run(cfg, recipe, overrides)


@app.command(context_settings={"ignore_unknown_options": True})
def train(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, metavar="[RECIPE] [OVERRIDES]...",
                                                     autocompletion=_complete_recipe_args)):
    """Pretrain a language model (CLM, MLM) on a step, token, epoch or wall-clock budget."""
    from lmtk.train.pretrain import run

    _launch_or_run("train", args, run)


@app.command(context_settings={"ignore_unknown_options": True})
def finetune(args: Optional[List[str]] = typer.Argument(None, help="[RECIPE] base=RUN [task=glue/sst2 | task=local ...] [peft=full|bitfit|lora] [key=value ...]",
                                                         metavar="[RECIPE] [OVERRIDES]...", autocompletion=_complete_recipe_args)):
    """Fine-tune a run (or a Hugging Face model) on a task or on text: full, BitFit or LoRA."""
    from lmtk.finetune.run import run

    _launch_or_run("finetune", args, run)


@app.command(context_settings={"ignore_unknown_options": True})
def distill(args: Optional[List[str]] = typer.Argument(None, help="[RECIPE] teacher=RUN [model/mixer=NAME] [model.layers=...] "
                                                        "[distill.init=...] [distill.stages=[mixer:0.1,kd:0.9]] [key=value ...]",
                                                        metavar="[RECIPE] [OVERRIDES]...", autocompletion=_complete_recipe_args)):
    """Distil a Transformer teacher into a student with subquadratic mixers: weight transfer, alignment stages, KD."""
    from lmtk.distill.run import run

    _launch_or_run("distill", args, run)


SEARCH_HELP = ("[RECIPE] key=[a,b] group=[x,y] ... [key=value ...]: a training recipe (default: 'default'), the grid "
               "(overrides with a list of values; their cartesian product) and overrides every candidate shares; "
               "search.train_steps=N trains the best (search.top=K) briefly")


@app.command(context_settings={"ignore_unknown_options": True})
def search(args: Optional[List[str]] = typer.Argument(None, help=SEARCH_HELP, metavar="[RECIPE] [OVERRIDES]...",
                                                      autocompletion=_complete_recipe_args)):
    """Rank a grid of model candidates at initialisation (hidden-covariance score, in seconds); optionally train the top few briefly."""
    from lmtk.config import check_recipe_command
    from lmtk.search import render, run

    recipe, overrides = _split(args)
    check_recipe_command(recipe, "train")  # candidates are pretraining runs
    render(run(recipe, overrides), _stdout_console())


@app.command()
def recipes():
    """List the recipes shipped with lmtk."""
    import yaml
    from rich.table import Table

    from lmtk.config import recipe_command, recipe_names, recipes_dir
    from lmtk.log import console

    t = Table(title="recipes  (lmtk COMMAND RECIPE key=value ...)")
    t.add_column("recipe", style="bold")
    t.add_column("command")
    t.add_column("description")
    for name in recipe_names():
        desc = (yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()) or {}).get("description", "")
        t.add_row(name, recipe_command(name), desc)
    console.file = sys.stdout
    console.print(t)


@app.command(context_settings={"ignore_unknown_options": True})
def config(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, metavar="[RECIPE] [OVERRIDES]...",
                                                      autocompletion=_complete_recipe_args)):
    """Print the composed, resolved config of a recipe with overrides applied."""
    from lmtk.config import compose, to_yaml

    recipe, overrides = _split(args)
    typer.echo(to_yaml(compose(recipe, overrides)), nl=False)


EVAL_HELP = ("RUN... [key=value ...]: run names (in $LMTK_RUNS or ./runs), run directories or checkpoint "
             "directories, then overrides: suite=ppl | suite=[ppl,pairs], <suite>.<key>=value, data=text data.val=FILE, "
             "device=, precision=, seed=")


@app.command("eval", context_settings={"ignore_unknown_options": True})
def eval_(args: Optional[List[str]] = typer.Argument(None, help=EVAL_HELP, metavar="RUN... [OVERRIDES]...",
                                                     autocompletion=_complete_eval_args)):
    """Evaluate runs or checkpoints: perplexity/bits-per-byte, minimal pairs, ...; results in <run>/eval/<suite>.json."""
    from lmtk.config import compose_eval
    from lmtk.eval.command import run

    args = list(args or [])
    n = next((i for i, a in enumerate(args) if "=" in a), len(args))
    targets, overrides = args[:n], args[n:]
    run(targets, compose_eval(overrides))


ROOT_HELP = "runs directory (default: $LMTK_RUNS or ./runs)"

runs_app = typer.Typer(
    help="Runs in the runs directory: the table (no subcommand), show, compare, rm.",
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(runs_app, name="runs")


def _root(ctx: typer.Context | None, root: str | None) -> str:
    """--root of the subcommand, else of `lmtk runs`, else $LMTK_RUNS, else ./runs."""
    parent = ctx.parent.params.get("root") if ctx is not None and ctx.parent is not None else None
    return root or parent or os.environ.get("LMTK_RUNS", "runs")


def _stdout_console():
    from lmtk.log import console

    console.file = sys.stdout
    if not sys.stdout.isatty():  # piped or captured: rich's 80 columns would cut the names
        console.width = max(console.width, 140)
    return console


@runs_app.callback()
def runs(
    ctx: typer.Context,
    root: str = typer.Option(None, "--root", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Table of runs: name, kind, status, parent, steps, tokens, val loss, val bpb, eval headlines, created."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from lmtk.runs import list_runs

    where = _root(None, root)
    rows = list_runs(where)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"runs in {where}")
    right = ("steps", "tokens", "val loss", "val bpb")
    for col in ("name", "kind", "status", "parent", "steps", "tokens", "val loss", "val bpb", "eval", "created"):
        # names and numbers are never cut or wrapped; parents and the eval headlines (one line per suite) wrap
        wrap = col in ("eval", "parent")
        t.add_column(col, justify="right" if col in right else "left", no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")
    for r in rows:
        vl, vb = r.get("val_loss"), r.get("val_bpb")
        t.add_row(
            r["name"], r.get("kind") or "?", r.get("status") or "?", r.get("parent") or "-",
            f"{r['steps']:,}" if r.get("steps") is not None else "-",
            f"{r['tokens']:,}" if r.get("tokens") is not None else "-",
            f"{vl:.4f}" if vl is not None else "-",
            f"{vb:.4f}" if vb is not None else "-",
            "\n".join(f"{suite} {h['score']}={h['value']:.3f}" for suite, h in (r.get("eval") or {}).items()) or "-",
            str(r.get("created", "?"))[:16],
        )
    _stdout_console().print(t)


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="run name (in the runs directory) or run directory", autocompletion=_complete_runs),
    root: str = typer.Option(None, "--root", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
):
    """One run: its config against its recipe, metrics summary, lineage (parents, children) and eval results."""
    from lmtk.runview import render_show, show_data

    d = show_data(_root(ctx, root), run)
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    render_show(d, _stdout_console())


@runs_app.command("compare")
def runs_compare(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="two or more run names or run directories", metavar="RUN RUN [RUN]...",
                               autocompletion=_complete_runs),
    root: str = typer.Option(None, "--root", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Runs side by side: kind, recipe, steps, tokens, params, train time, losses, eval headlines, config differences."""
    from lmtk.runview import compare_data, render_compare

    d = compare_data(_root(ctx, root), list(names))
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    render_compare(d, _stdout_console())


@runs_app.command("rm")
def runs_rm(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., help="run names or run directories", metavar="RUN...", autocompletion=_complete_runs),
    root: str = typer.Option(None, "--root", help=ROOT_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
):
    """Delete runs (after confirmation); refuses a run that is running."""
    from lmtk.runs import RunDir, children, dir_size, remove, writer_pid

    where = _root(ctx, root)
    targets = [RunDir.open(where, n) for n in dict.fromkeys(names)]
    for run in targets:  # refuse before asking anything
        pid = writer_pid(run.path)
        if pid is not None:
            raise UserError(f"run '{run.name}' is running (process {pid}); stop it first (Ctrl-C), then lmtk runs rm {run.name}")
    for run in targets:
        info = run.info()
        kids = [n for n, _, _ in children(where, run.path) if n not in {t.name for t in targets}]
        n = len(run.checkpoints()) + (run.ckpt_dir / "final").is_dir()
        line = (f"delete run '{run.name}' ({info.get('kind') or '?'}, {info.get('status') or '?'}, "
                f"{n} checkpoint{'s' * (n != 1)}, {dir_size(run.path) / 2**20:.1f} MiB) at {run.path}")
        if kids:
            line += f"; runs started from it keep only its path: {', '.join(kids)}"
        if yes:
            typer.echo(line, err=True)
        else:
            try:
                ok = typer.confirm(line + "?", default=False, err=True)
            except typer.Abort:  # end of input: no answer is no
                typer.echo("", err=True)
                ok = False
            if not ok:
                typer.echo(f"kept run '{run.name}' (and any after it)", err=True)
                raise typer.Exit(1)
        remove(run)
        typer.echo(f"deleted run '{run.name}'")


class XAxis(str, Enum):
    step = "step"
    tokens = "tokens"
    time = "time"


@app.command()
def plot(
    runs: List[str] = typer.Argument(..., help="run names (in the runs directory) or run directories", metavar="RUN...",
                                     autocompletion=_complete_runs),
    x: XAxis = typer.Option(XAxis.step, "--x", help="x-axis: step, tokens seen, or wall time since the first row"),
    out: str = typer.Option(None, "--out", "-o", help="folder for the PNGs (default, one run: <run>/plots/; several runs: required)"),
    root: str = typer.Option(None, "--root", help=ROOT_HELP),
):
    """PNGs of train loss, val loss / bits-per-byte, learning rate and tokens/s; several runs overlaid (needs matplotlib: the plot extra)."""
    from pathlib import Path

    from lmtk.plot import plot_dir, plot_runs, require_matplotlib
    from lmtk.runs import RunDir

    where = _root(None, root)
    targets = [RunDir.open(where, n) for n in dict.fromkeys(runs)]
    if len(targets) > 1 and out is None:
        raise UserError(f"{len(targets)} runs are overlaid into one set of plots: name a folder for them with --out DIR")
    require_matplotlib()
    dest = Path(out) if out is not None else plot_dir(targets[0])
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the PNGs")
    files, notes = plot_runs(targets, dest, x.value)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {len(files)} plots to {dest}/: {', '.join(f.name for f in files)}")


@app.command()
def generate(
    run: str = typer.Argument(..., help="run name, run directory or checkpoint directory", autocompletion=_complete_runs),
    prompt: str = typer.Option("", "--prompt", "-p", help="text to continue"),
    max_new: int = typer.Option(100, "--max-new", "-n", help="tokens to generate"),
    temperature: float = typer.Option(0.8, help="0: greedy"),
    top_k: int = typer.Option(50, help="sample from the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, help="sample from the smallest set of tokens whose probability reaches p (1: all)"),
    seed: int = typer.Option(0),
    fill_mask: bool = typer.Option(False, "--fill-mask", help="instead: replace each [MASK] in the prompt (masked LM)"),
    root: str = typer.Option(None, "--root", help="runs directory (default: $LMTK_RUNS or ./runs)"),
):
    """Continue a prompt with a trained model (causal LM), or fill its [MASK]s (masked LM)."""
    import torch

    from lmtk import checkpoint
    from lmtk.models import infer

    model, tok, meta = checkpoint.load_pretrained(run, root=root or os.environ.get("LMTK_RUNS", "runs"))
    shift = checkpoint.masked_shift(meta)
    if fill_mask:
        if "[MASK]" not in prompt:
            raise UserError("--fill-mask needs a prompt with [MASK] in it")
        from lmtk.data.tokenizer import require_special

        require_special(tok, "mask", "--fill-mask fills")
        parts = prompt.split("[MASK]")
        ids = []
        for i, part in enumerate(parts):
            ids += tok.encode(part) if part else []
            if i < len(parts) - 1:
                ids.append(tok.mask_id)
        out = infer.fill_mask(model, torch.tensor([ids]), tok.mask_id, shift)
    else:
        ids = tok.encode(prompt) or [tok.eos_id]
        gen = torch.Generator().manual_seed(seed)
        # past max_seq_len the model sees the last max_seq_len tokens (a sliding window)
        if not 0 < top_p <= 1:
            raise UserError(f"--top-p {top_p} must be in (0, 1]")
        out = infer.generate(model, torch.tensor([ids]), max_new, temperature, top_k or None, gen, model.cfg.max_seq_len, top_p)
    typer.echo(tok.decode(out[0].tolist()))


@app.command()
def export(
    run: str = typer.Argument(..., help="run name, run directory or checkpoint directory"),
    out: str = typer.Argument(..., help="the directory to write (new, or empty; --force replaces it)"),
    to: str = typer.Option("hf", "--to", help="format: hf (a Hugging Face directory transformers loads)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists and is not empty"),
    root: str = typer.Option(None, "--root", help="runs directory (default: $LMTK_RUNS or ./runs)"),
):
    """Export a run as a Hugging Face model directory (GPT-2, Llama, Mistral or BERT for transformers)."""
    if to not in ("hf",):
        raise UserError(f"--to {to}: lmtk exports to hf (a Hugging Face model directory) only")
    from lmtk.models.hf_export import export_hf

    info = export_hf(run, out, force=force, root=root or os.environ.get("LMTK_RUNS", "runs"))
    auto = "AutoModelForMaskedLM" if info["family"] == "bert" else "AutoModelForCausalLM"
    typer.echo(f"exported {info['checkpoint']} as {info['architecture']} to {info['path']} ({', '.join(info['files'])}); "
               f"load it with transformers.{auto}.from_pretrained({info['path']!r})")


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(shell: Shell = typer.Argument(..., help="bash, zsh or fish")):
    """Print the shell completion script: eval "$(lmtk completion bash)" (in ~/.bashrc), likewise zsh; fish: | source."""
    from lmtk.completion import script

    typer.echo(script(shell.value), nl=False)


def _click_error(err: Exception) -> bool:
    # typer vendors click (typer._click), so match its exceptions by shape, not by class.
    return hasattr(err, "format_message") and hasattr(err, "exit_code")


def main() -> None:
    from lmtk.completion import COMPLETE_VAR

    if os.environ.get(COMPLETE_VAR):  # the shell asks for completions (lmtk completion SHELL's script)
        from lmtk.completion import complete_main

        sys.exit(complete_main(app))
    debug = os.environ.get("LMTK_DEBUG") == "1"
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside training (tokenising, set-up): nothing to checkpoint yet
        if os.environ.get("RANK", "0") == "0":
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        from lmtk.train.loop import Interrupted

        if isinstance(err, Interrupted):
            if os.environ.get("RANK", "0") == "0":  # data-parallel: rank 0 speaks for all
                print(str(err), file=sys.stderr)
            sys.exit(err.exit_code)
        if type(err).__name__ == "Abort":
            print("aborted", file=sys.stderr)
            sys.exit(130)
        if _click_error(err) and not debug:
            print(f"error: {err.format_message()}  (lmtk --help)", file=sys.stderr)
            sys.exit(2)
        raise
