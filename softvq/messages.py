"""How the library's errors and warnings name a list (files, keys, classes) without flooding the
terminal: the first few, then how many more."""

from __future__ import annotations

from collections.abc import Sequence


def first_few(items: Sequence[object], limit: int = 8, sep: str = ", ") -> str:
    """``items`` joined by ``sep``, cut after ``limit`` with " and N more": "a, b, c and 5 more".
    An empty sequence gives ""."""
    if limit < 1:
        raise ValueError(f"limit must be 1 or more, got {limit}")
    shown = sep.join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def ignored_flags(flags: Sequence[str], where: str, *, reason: str = "", instead: str = "") -> ValueError:
    """The error for ``flags`` given where they would be ignored, which would read as "it made no
    difference": "--a, --b apply only to WHERE; REASON: INSTEAD, or drop them"."""
    one = len(flags) == 1
    text = f"{first_few(flags)} appl{'ies' if one else 'y'} only to {where}" + (f"; {reason}" if reason else "")
    return ValueError(f"{text}: {instead + ', or ' if instead else ''}drop {'it' if one else 'them'}")
