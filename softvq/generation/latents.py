"""A latent folder, as ``softvq pretokenize`` writes it (layout in
:mod:`softvq.generation.pretokenize`), read back whole for a generator to train on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

META_NAME = "meta.json"
PROGRESS_NAME = "progress.json"
PROGRESS_GLOB = "progress*.json"  # an unfinished pretokenize's progress files (one per process)
FORMAT = "softvq-latents"


@dataclass
class LatentSet:
    """A whole shard folder in memory: latents (N, L, D), labels (N,), names, and its meta."""

    latents: Tensor
    labels: Tensor
    names: list[str]
    meta: dict

    @property
    def mean(self) -> float:
        """The scalar latent mean over the whole set (what a generator normalises with)."""
        return float(self.meta["latent_mean"])

    @property
    def std(self) -> float:
        """The scalar latent standard deviation over the whole set."""
        return float(self.meta["latent_std"])

    @property
    def classes(self) -> list[str]:
        """Class names, in label order."""
        return list(self.meta["classes"])


def latent_set_sha1(meta: dict[str, Any]) -> str:
    """Identity of a latent set: its ``meta.json`` (shards, statistics, tokenizer), wherever it lies."""
    return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def load_latents(folder: str | Path) -> LatentSet:
    """Read every shard listed in ``meta.json`` (errors name the missing or corrupt file)."""
    from safetensors import safe_open

    folder = Path(folder)
    meta_file = folder / META_NAME
    if not folder.exists():
        raise FileNotFoundError(f"latent folder {folder} does not exist; make one with `softvq pretokenize {folder} ...`")
    if folder.is_file():
        holder = f" that holds it, {folder.parent}" if folder.name == META_NAME else ""
        raise ValueError(f"{folder} is a file; pass the latent folder{holder}")
    if not meta_file.is_file() and any(folder.glob(PROGRESS_GLOB)):
        raise ValueError(f"{folder} is an unfinished latent set (pretokenize was interrupted: it has progress files "
                         f"but no {META_NAME}); rerun the same pretokenize command to finish it")
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} has no {META_NAME}; make it with `softvq pretokenize`")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_file} is not valid JSON ({exc}); make the latents again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} is not a softvq latent folder")
    missing = [key for key in ("shards", "classes", "latent_mean", "latent_std") if key not in meta]
    if missing:
        raise ValueError(f"{meta_file} lacks {', '.join(missing)}: it is damaged or was not written by softvq "
                         f"pretokenize; make the latents again")
    latents, labels, names = [], [], []
    for shard in meta["shards"]:
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"latent shard {path} listed in {META_NAME} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                latents.append(f.get_tensor("latents"))
                labels.append(f.get_tensor("labels"))
                names += json.loads((f.metadata() or {}).get("names", "[]"))
        except Exception as exc:
            raise ValueError(f"latent shard {path} is corrupt ({type(exc).__name__})") from None
    return LatentSet(torch.cat(latents), torch.cat(labels), names, meta)
