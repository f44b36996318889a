"""Pieces the benchmark scripts share (they run as `python bench/<name>.py`, so `import common` works)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace


def table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def stub_tokenizer(vocab: int):
    """What objectives read from a tokenizer: the five specials at ids 0-4 (lmtk's layout)."""
    return SimpleNamespace(vocab_size=vocab, pad_id=0, unk_id=1, cls_id=2, eos_id=3, mask_id=4, special_ids=[0, 1, 2, 3, 4])


def parse_with_overrides(parser, argv):
    """argparse args plus trailing key=value overrides (anything else is an error)."""
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides must be key=value)")
    args.overrides = extra
    return args


def text_dir(path) -> Path:
    """A corpus directory with train.txt and val.txt, resolved; exits with how to build one if absent."""
    data = Path(path).resolve()
    if not (data / "train.txt").is_file():
        sys.exit(f"no {data}/train.txt: build real English with bash ../shared/corpora/english.sh {path}")
    return data


def steps_on_text(data, steps: int) -> list[str]:
    """`lmtk train` overrides: the text corpus in `data` for exactly `steps` steps (the default
    recipe's wall-clock budget off, so a loaded machine does not cut a run short)."""
    return ["data=text", f"data.train={data}/train.txt", f"data.val={data}/val.txt", "budget.hours=null", f"budget.steps={steps}"]
