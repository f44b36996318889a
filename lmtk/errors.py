"""User-facing errors: one line on stderr, exit status 2, no traceback (unless LMTK_DEBUG=1)."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user. The message names the problem and the fix."""

    exit_code = 2


def suggest(word: str, choices, n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' -- appended to unknown-name errors."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
