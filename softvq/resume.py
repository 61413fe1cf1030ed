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


def differences(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for each setting that differs, in the saved
    order, then new keys; nested dicts are compared key by key (``source.seed``).

    ``current`` is compared as JSON would store it (tuples become lists), since ``saved`` was read
    back from JSON; top-level keys in ``ignore`` are not compared.
    """
    current = json.loads(json.dumps(current))
    skip = set(ignore)
    out: list[tuple[str, Any, Any]] = []
    for key in dict.fromkeys([*saved, *current]):
        old, new = saved.get(key), current.get(key)
        if key in skip or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += [(f"{key}.{inner}", a, b) for inner, a, b in differences(old, new)]
        else:
            out.append((key, old, new))
    return out


def changed_settings(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """:func:`differences` as ``"key old -> new"`` lines (``"source.seed 0 -> 3"``); long lists
    (labels, class names) are summarised by their lengths."""
    out = []
    for key, old, new in differences(saved, current, ignore):
        if any(isinstance(v, list) and len(v) > LONG_LIST for v in (old, new)):
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


def listing_sha1(names: Iterable[str]) -> str:
    """sha1 of ``names`` in their order, one per line: which files, in which order, saved work
    was made from (the files' content is the weights' and settings' business, not this)."""
    # surrogateescape: a file name that is not UTF-8 (Latin-1 in scraped data) hashes as its own bytes
    return hashlib.sha1("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
