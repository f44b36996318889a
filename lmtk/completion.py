"""Shell completion: `lmtk completion bash|zsh|fish` prints the script; the shell then runs
`lmtk` with _LMTK_COMPLETE=complete_<shell> to ask for candidates.

Commands, subcommands and --options complete through click (typer's parser); the callbacks
here (typer's `autocompletion=`) complete what lmtk's free-form arguments take: recipe names,
`group=option` (conf/<group>/*.yaml, nested groups such as model/mixer), config keys (the
schema's, each mixer's knobs) one section at a time (`model.` then `model.d_model=`), fixed
choices (precision=bf16), run names ($LMTK_RUNS or ./runs, or --root) for RUN arguments and
for base= / teacher= / resume=, and lmtk eval's suite= and <suite>.<key>=.

Bash splits words at '=' and ':' (COMP_WORDBREAKS), so its script sends the line up to the
cursor instead of COMP_WORDS and gets back only the part of each candidate after the last
break, which is what bash replaces. zsh and fish see whole words: typer's scripts serve them.
The callbacks import no torch: a completion answers in well under a second.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

COMPLETE_VAR = "_LMTK_COMPLETE"
LINE_VAR = "_LMTK_COMPLETE_LINE"
SHELLS = ("bash", "zsh", "fish")

# keys whose value is a run (or a checkpoint / model directory)
RUN_KEYS = ("base", "teacher", "resume", "tokenizer.path")

BASH_SCRIPT = """\
_lmtk_completion() {
    local IFS=$'\\n'
    COMPREPLY=( $( env %(var)s=complete_bash %(line_var)s="${COMP_LINE:0:$COMP_POINT}" \\
                   _LMTK_WORDBREAKS="$COMP_WORDBREAKS" %(prog)s 2>/dev/null ) )
    local c
    for c in "${COMPREPLY[@]}"; do  # a key (model.), a key= or a folder: keep typing, no space
        case "$c" in *= | *. | */) compopt -o nospace 2>/dev/null; break;; esac
    done
    return 0
}
complete -o default -F _lmtk_completion %(prog)s
"""


def _root(ctx=None) -> Path:
    """--root given on the line so far (the command's or `lmtk runs`'s), else $LMTK_RUNS, else ./runs."""
    while ctx is not None:
        root = (ctx.params or {}).get("root")
        if root:
            return Path(root).expanduser()
        ctx = ctx.parent
    return Path(os.environ.get("LMTK_RUNS", "runs")).expanduser()


def run_names(root: Path | str | None = None, incomplete: str = "") -> list[str]:
    """Names of the runs in `root` (directories with a run.json) that start with `incomplete`."""
    base = Path(root) if root is not None else _root()
    try:
        names = sorted(p.name for p in base.iterdir() if (p / "run.json").is_file())
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


@lru_cache(maxsize=None)
def group_names() -> tuple[str, ...]:
    """Config groups a recipe takes as group=option: conf/'s folders (not eval/) and the nested
    folders the group's own files pull in as a group (model/mixer; task/glue is an option prefix)."""
    from lmtk.config import conf_dir, groups

    out = []
    for g in groups():
        out.append(g)
        for sub in sorted(p for p in (conf_dir() / g).iterdir() if p.is_dir()):
            pulled = re.compile(rf"^\s*-\s*(override\s+)?{re.escape(sub.name)}\s*:", re.M)
            if any(pulled.search(f.read_text()) for f in (conf_dir() / g).glob("*.yaml")):
                out.append(f"{g}/{sub.name}")
    return tuple(out)


@lru_cache(maxsize=None)
def group_choices(group: str) -> tuple[str, ...]:
    """The options of a group: its yaml files, and sub/option for option folders (task=glue/sst2)."""
    from lmtk.config import conf_dir

    d = conf_dir() / group
    if not d.is_dir():
        return ()
    opts = [p.stem for p in sorted(d.glob("*.yaml"))]
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        if f"{group}/{sub.name}" not in group_names():
            opts += [f"{sub.name}/{p.stem}" for p in sorted(sub.glob("*.yaml"))]
    return tuple(opts)


@lru_cache(maxsize=None)
def config_keys() -> tuple[str, ...]:
    """Every leaf key of a training config: the schema's, with model.mixer.* the mixers' knobs."""
    import yaml
    from omegaconf import OmegaConf

    from lmtk.config import conf_dir
    from lmtk.schema import Config

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    keys = set(flat(OmegaConf.to_container(OmegaConf.structured(Config))))
    keys.difference_update({"model.mixer", "recipe", "description"})  # set by the recipe, not by overrides
    for f in (conf_dir() / "model" / "mixer").glob("*.yaml"):
        keys.update(f"model.mixer.{k}" for k in (yaml.safe_load(f.read_text()) or {}) if k != "defaults")
    return tuple(sorted(keys))


def _choices(key: str) -> list[str]:
    from lmtk.schema import CHOICES

    if key in CHOICES:
        return list(CHOICES[key])
    if key in ("resume",):
        return ["auto"]
    return []


def _step_keys(keys, incomplete: str) -> list[str]:
    """Complete a dotted key one section at a time: 'mo' -> 'model.', 'model.d' -> 'model.d_model='."""
    out = set()
    depth = incomplete.count(".")
    for k in keys:
        if not k.startswith(incomplete):
            continue
        parts = k.split(".")
        out.add(".".join(parts[: depth + 1]) + ("." if len(parts) > depth + 1 else "="))
    return sorted(out)


def override_candidates(incomplete: str, root: Path | None = None) -> list[str]:
    """Candidates for one `key=value` / `group=option` word of train / finetune / distill / config."""
    if "=" in incomplete:
        key, _, value = incomplete.partition("=")
        bare = key.lstrip("+~")
        if bare in group_names():
            vals = list(group_choices(bare))
        elif bare in RUN_KEYS:
            vals = run_names(root, value)
        else:
            vals = _choices(bare)
        return [f"{key}={v}" for v in vals if v.startswith(value)]
    groups = [f"{g}=" for g in group_names() if g.startswith(incomplete)]
    return sorted(set(groups + _step_keys(config_keys(), incomplete)))


def complete_recipe_args(ctx, incomplete: str) -> list[str]:
    """The [RECIPE] [OVERRIDES]... argument: a recipe name first, then overrides."""
    from lmtk.config import recipe_names

    before = [a for a in (ctx.params.get("args") or []) if a] if ctx is not None else []
    out = []
    if not before and "=" not in incomplete:
        out += [r for r in recipe_names() if r.startswith(incomplete)]
    return out + override_candidates(incomplete, _root(ctx))


def complete_runs(ctx, incomplete: str) -> list[str]:
    """RUN arguments: run names in the runs directory (but those already on the line)."""
    given = set()
    for key in ("names", "runs"):
        given.update((ctx.params or {}).get(key) or () if ctx is not None else ())
    return [n for n in run_names(_root(ctx), incomplete) if n not in given]


@lru_cache(maxsize=None)
def _eval_keys() -> tuple[str, ...]:
    import yaml

    from lmtk.config import conf_dir

    top = yaml.safe_load((conf_dir() / "eval.yaml").read_text()) or {}
    keys = [k for k in top if k != "defaults"]
    for f in sorted((conf_dir() / "eval").glob("*.yaml")):
        keys += [f"{f.stem}.{k}" for k in (yaml.safe_load(f.read_text()) or {})]
    return tuple(sorted(keys))


def complete_eval_args(ctx, incomplete: str) -> list[str]:
    """lmtk eval: run names, then suite=NAME, <suite>.<key>=, data=, device=, precision=, seed=."""
    from lmtk.config import conf_dir

    before = [a for a in (ctx.params.get("args") or []) if a] if ctx is not None else []
    out = []
    if "=" in incomplete:
        key, _, value = incomplete.partition("=")
        vals = {"suite": [p.stem for p in sorted((conf_dir() / "eval").glob("*.yaml"))],
                "data": list(group_choices("data"))}.get(key) or _choices(key)
        return [f"{key}={v}" for v in vals if v.startswith(value)]
    if not any("=" in a for a in before):
        out += run_names(_root(ctx), incomplete)
    return out + ["data="] * "data=".startswith(incomplete) + _step_keys(_eval_keys(), incomplete)


# ---- the shell side -----------------------------------------------------------------------


def script(shell: str, prog: str = "lmtk") -> str:
    from lmtk.errors import UserError

    if shell not in SHELLS:
        raise UserError(f"no completion for shell '{shell}'; one of: {', '.join(SHELLS)}")
    if shell == "bash":
        return BASH_SCRIPT % {"var": COMPLETE_VAR, "line_var": LINE_VAR, "prog": prog}
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=prog, complete_var=COMPLETE_VAR, shell=shell)


def _shell_completion():
    """click's shell_completion module: typer's vendored copy (typer >= 0.2x), else click's own."""
    try:
        from typer._click import shell_completion
    except ImportError:
        from click import shell_completion
    return shell_completion


def _bash_words() -> tuple[list[str], str, str]:
    """(args after the program, the incomplete word, the part of it bash will replace) from
    _LMTK_COMPLETE_LINE (lmtk's script), else from COMP_WORDS / COMP_CWORD (click's convention,
    where bash has already cut `key=value` into key, =, value: glued back together)."""
    split_arg_string = _shell_completion().split_arg_string

    line = os.environ.get(LINE_VAR)
    if line is not None:
        words = split_arg_string(line)
        if line and not line[-1].isspace() and words:
            args, incomplete = words[1:-1], words[-1]
        else:
            args, incomplete = words[1:], ""
    else:
        cwords = split_arg_string(os.environ.get("COMP_WORDS", ""))
        cword = int(os.environ.get("COMP_CWORD", len(cwords)))
        glued: list[str] = []
        for i, w in enumerate(cwords[: cword + 1]):
            if glued and (w in ("=", ":") or glued[-1].endswith(("=", ":"))) and i > 1:
                glued[-1] += w
            else:
                glued.append(w)
        if cword >= len(cwords):
            glued.append("")
        args, incomplete = glued[1:-1], glued[-1] if glued else ""
    breaks = os.environ.get("_LMTK_WORDBREAKS", "=:")
    cut = max((incomplete.rfind(c) for c in breaks if c not in " \t\n\"'"), default=-1)
    return args, incomplete, incomplete[: cut + 1]


def complete_main(cli_app) -> int:
    """Answer one completion request (the environment names the shell); returns the exit status."""
    import typer

    instruction = os.environ.get(COMPLETE_VAR, "")
    _, _, shell = instruction.partition("_")
    cmd = typer.main.get_command(cli_app)
    if shell != "bash":
        from typer._completion_classes import completion_init
        from typer.completion import shell_complete

        completion_init()
        return shell_complete(cmd, {}, "lmtk", COMPLETE_VAR, instruction)
    class _Bash(_shell_completion().ShellComplete):
        name = "bash"
        source_template = ""

        def source_vars(self) -> dict:
            return {}

        def get_completion_args(self):
            return _bash_words()[:2]

        def format_completion(self, item) -> str:
            return item.value

    args, incomplete, prefix = _bash_words()
    items = _Bash(cmd, {}, "lmtk", COMPLETE_VAR).get_completions(args, incomplete)
    print("\n".join(item.value[len(prefix):] if item.value.startswith(prefix) else item.value for item in items))
    return 0
