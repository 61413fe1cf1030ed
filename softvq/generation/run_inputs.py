"""What a generator run is checked against before it trains: its latent set (usable statistics,
finite latents) and the ``--tokenizer`` that will decode its samples (one that exists and makes
latents of the set's shape, and, where it can be told, the one that made them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from softvq.checkpoint.specs import looks_like_hub_id
from softvq.generation.checkpoint import folder_kind
from softvq.generation.latents import LatentSet


def tokenizer_spec(spec: str, latent_shape: tuple[int, ...] | None = None, *, named: str = "--tokenizer",
                   holds: str = "the latent set holds",
                   fix: str = "pass the tokenizer pretokenize used (its meta.json names it)") -> str:
    """``--tokenizer`` (the setting ``named``) checked now, not when ``generate`` first loads it after
    a long run, and recorded as :func:`softvq.checkpoint.specs.portable_spec` does (a local folder
    made absolute). A preset or local folder whose latents are not ``latent_shape`` (L, D), what
    ``holds`` names, is refused too."""
    from softvq.checkpoint.pretrained import CONFIG_NAME, training_run_export
    from softvq.checkpoint.specs import OFFICIAL_PREFIX, is_preset, portable_spec
    from softvq.config import PRESETS

    def same_shape(config: dict[str, Any]) -> str:
        shape = (config.get("num_tokens"), (config.get("bottleneck") or {}).get("latent_dim"))
        if latent_shape is not None and shape != tuple(latent_shape):
            raise ValueError(f"{named} {spec} makes {shape} latents but {holds} {tuple(latent_shape)}; {fix}")
        return portable_spec(spec)

    kinds = "a preset name, a tokenizer folder or training run, a hub id 'org/name', or official:FOLDER_OR_HUB_ID"
    if is_preset(spec):
        return same_shape(PRESETS[spec.lower()].to_dict())
    if spec.startswith(OFFICIAL_PREFIX) and spec[len(OFFICIAL_PREFIX):].strip():
        return portable_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        kind = folder_kind(path)
        if kind in ("tokenizer", "tokenizer run"):
            payload = json.loads(((training_run_export(path) or path) / CONFIG_NAME).read_text())
            return same_shape(payload.get("config") or {})
        what: dict[str | None, str] = {
            "latent set": "a latent set (pretokenize's output)", "generator": "a DiT/SiT/MAR generator",
            "generator run": "a DiT/SiT/MAR generator", "unfinished generator run": "a DiT/SiT/MAR generator run"}
        raise ValueError(f"{named} {spec} is {what.get(kind, 'not a softvq tokenizer folder')}; pass the "
                         f"tokenizer that decodes the latents: {kinds}")
    if path.is_file():
        raise checkpoint_file_refused(named, spec)
    text = spec.strip()
    if looks_like_hub_id(text):  # generate downloads it
        return spec
    raise ValueError(f"{named} {spec!r} is not {kinds}")


def checkpoint_file_refused(named: str, spec: str) -> ValueError:
    """The error for a training checkpoint file given as the tokenizer a latent set or generator
    records: it loads, but a run deletes all but its last few checkpoints, and the record outlives it."""
    return ValueError(f"{named} {spec} is a file; the tokenizer is recorded for generate to load later, and a run "
                      f"keeps only its last checkpoints: save it as a folder first (softvq info {spec} --save DIR) "
                      f"and pass DIR")


def other_tokenizer(spec: str, latents_meta: dict[str, Any]) -> str | None:
    """How ``spec`` (as :func:`tokenizer_spec` returns it) differs from the tokenizer that made the
    latents, where that can be told without a download: a local tokenizer's weights by their sha1, a
    preset by its name (its weights are random); None where it is the same or cannot be told."""
    from softvq.checkpoint.pretrained import training_run_export
    from softvq.checkpoint.specs import is_preset
    from softvq.resume import weights_sha1
    from softvq.tokenizer import Tokenizer

    made_by, made_sha1 = latents_meta.get("tokenizer"), latents_meta.get("tokenizer_sha1")
    if is_preset(spec):
        same = made_by is not None and str(made_by).lower() == spec.lower()
        return None if same or made_by is None else f"{spec} is a preset with random weights; the latents were " \
                                                    f"made by {made_by}"
    path = Path(spec).expanduser()
    if made_sha1 is None or not path.is_dir():  # a hub id or official: release, read only by generate
        return None
    sha1 = weights_sha1(Tokenizer.from_pretrained(training_run_export(path) or path))
    return None if sha1 == made_sha1 else f"{spec} has weights (sha1 {sha1[:10]}) other than those that made the " \
                                          f"latents ({made_sha1[:10]}, {made_by})"


def check_latent_set(data: LatentSet, folder: str) -> None:
    """Training normalises the latents as (z − mean) / std: a std of 0 or a non-finite statistic or
    latent makes every loss NaN from the first step, so such a set is refused before training."""
    from softvq.generation.latents import META_NAME

    stats = {name: data.meta[name] for name in ("latent_mean", "latent_std")}
    try:
        usable = math.isfinite(data.mean) and math.isfinite(data.std) and data.std > 0
    except (TypeError, ValueError):  # null or text in meta.json
        usable = False
    if not usable:
        given = " and ".join(f"{name} {value!r}" for name, value in stats.items())
        raise ValueError(f"{Path(folder) / META_NAME} gives {given}; training normalises the latents as "
                         f"(z - mean) / std, which needs a finite mean and a positive finite std: make the latent "
                         f"set again with softvq pretokenize")
    if not bool(torch.isfinite(data.latents).all()):
        raise ValueError(f"the latent set {folder} holds NaN or infinite latents (its tokenizer made them); make it "
                         f"again with softvq pretokenize, e.g. with --precision fp32")
