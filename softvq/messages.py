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
