"""Continuing interrupted work: a rerun must repeat the settings the saved work was made with.

Every long job that continues from saved work (the generator trainer, ``pretokenize``, ``eval``,
``generate``) compares the settings it saved with the ones it is given now and refuses to mix
the two, naming what differs so the user can rerun as before or start afresh. The tokenizer
trainer compares the same way but refuses only model settings under which the saved weights no
longer load; other changes (a lower learning rate after a divergence, more steps) are allowed and
named in its log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

LONG_LIST = 8  # lists longer than this (labels, class names) are summarised by their lengths


def changed_settings(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``"key old -> new"`` for each key whose value differs, in the saved order, then new keys.

    ``current`` is compared as JSON would store it (tuples become lists), since ``saved`` was read
    back from JSON; keys in ``ignore`` are not compared. Nested dicts are compared key by key
    (``"source.seed 0 -> 3"``).
    """
    current = json.loads(json.dumps(current))
    skip = set(ignore)
    out = []
    for key in dict.fromkeys([*saved, *current]):
        old, new = saved.get(key), current.get(key)
        if key in skip or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # "source.seed 0 -> 3", not both dicts whole
            out += [f"{key}.{line}" for line in changed_settings(old, new)]
        elif any(isinstance(v, list) and len(v) > LONG_LIST for v in (old, new)):
            out.append(f"{key} differ ({len(old or [])} -> {len(new or [])} items)")
        else:
            out.append(f"{key} {old!r} -> {new!r}")
    return out


def weights_sha1(module: nn.Module) -> str:
    """sha1 of a module's state dict (names and raw bytes): saved work made by other weights, such
    as a generator trained further under the same path, must not be continued with these."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
