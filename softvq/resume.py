"""Continuing interrupted work: a rerun must repeat the settings the saved work was made with.

Every long job that continues from saved work (the generator trainer, ``pretokenize``, ``eval``,
``generate``) compares the settings it saved with the ones it is given now and refuses to mix
the two, naming what differs so the user can rerun as before or start afresh.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

LONG_LIST = 8  # lists longer than this (labels, class names) are summarised by their lengths


def changed_settings(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``"key old -> new"`` for each key whose value differs, in the saved order, then new keys.

    ``current`` is compared as JSON would store it (tuples become lists), since ``saved`` was read
    back from JSON; keys in ``ignore`` are not compared.
    """
    current = json.loads(json.dumps(current))
    skip = set(ignore)
    out = []
    for key in dict.fromkeys([*saved, *current]):
        old, new = saved.get(key), current.get(key)
        if key in skip or old == new:
            continue
        if any(isinstance(v, list) and len(v) > LONG_LIST for v in (old, new)):
            out.append(f"{key} differ ({len(old or [])} -> {len(new or [])} items)")
        else:
            out.append(f"{key} {old!r} -> {new!r}")
    return out
