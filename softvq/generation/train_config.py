"""The settings of a generator run (``softvq train-generator``): :class:`GeneratorTrainConfig`,
its per-objective recipes, and how ``RUN/config.json`` records them and gives them back.

The recipes of the paper's supp. C.2, chosen by ``objective`` (every field can be overridden):

* DiT / SiT: AdamW (β2 0.999), constant learning rate 1e-4, no weight decay, global batch 256,
  size XL for 3M steps (Sec. 4.1's main runs; its Tab. 3 runs are SiT-L for 400K: ``--size L
  --steps 400000``);
* MAR: AdamW with β = (0.9, 0.95), weight decay 0.02 (not on biases and norms), maximum
  learning rate 2e-4 ("a higher learning rate leads to NaN"), a 100-epoch linear warm-up then
  constant, 500 epochs in all (epochs of the latent set, turned into steps at the start of a run),
  gradient clipping at 3.0 (MAR's release), global batch 2048, size H;

and for all: EMA of the weights (decay 0.9999) used for sampling, class-label dropout 0.1,
latents normalised as (z − mean) / std.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from softvq.generation.checkpoint import is_run_config
from softvq.generation.mar import MARConfig, mar_config
from softvq.generation.models import GeneratorConfig, generator_config
from softvq.messages import ignored_flags
from softvq.randomness import SEED_LIMIT
from softvq.typed_config import check_field_types, check_ranges


def flag_name(field: str) -> str:
    """The ``train-generator`` flag of a :class:`GeneratorTrainConfig` field: ``batch_size`` is
    ``--batch-size`` (errors name fields by their flags)."""
    return "--" + field.replace("_", "-")


@dataclass
class GeneratorTrainConfig:
    """Everything a generator run needs; written resolved to ``RUN/config.json`` (a rerun that
    continues the run updates it: :func:`~softvq.generation.run_folder.record_continuation`). Each field is the
    ``train-generator`` flag of the same name (``batch_size`` is ``--batch-size``), and errors name
    fields by their flags.

    objective:    ``sit``, ``dit`` or ``mar``; fields left at ``None`` take that objective's recipe
                  (:data:`RECIPES`).
    size:         DiT/SiT S, B, L, XL or MAR B, L, H.
    width / depth / heads (and MAR's head_width / head_depth) override the named ``size``.
    buffer_size / diffusion_batch_mul / grad_checkpointing: MAR only (defaults 64, 4, off); a
                  smaller buffer makes CPU-sized runs on few tokens much cheaper.
    steps / epochs: training length, in optimiser steps or in passes over the latent set
                  (ceil(epochs · count / batch_size) steps); give one. Recipe: DiT/SiT 3M steps,
                  MAR 500 epochs.
    warmup_steps / warmup_epochs: linear learning-rate warm-up from 0, then constant; give one.
                  Recipe: DiT/SiT none, MAR 100 epochs.
    ema_warmup: decay min(ema_decay, (1+n)/(10+n)) so short runs do not average the random init.
    max_nonfinite: a step whose loss or gradient is not finite is skipped (no update); after this many
                in the run, it stops with an error naming its last checkpoint, as the tokenizer trainer does.
    export_at:  steps at which the EMA generator is also exported, to ``RUN/generator-step-NNNNNNNN``
                (supp. Tab. 9, arXiv Tab. 8: 400000 1000000 2000000 3000000 4000000); a rerun may
                add steps, and the one it resumes at is exported from the EMA it loads.
    """

    latents: str = ""
    out: str = "runs/generator"
    objective: Literal["sit", "dit", "mar"] = "sit"
    size: Literal["S", "B", "L", "XL", "H"] | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    head_width: int | None = None
    head_depth: int | None = None
    buffer_size: int | None = None
    diffusion_batch_mul: int | None = None
    grad_checkpointing: bool = False
    path: Literal["cosine", "linear"] | None = None
    schedule: Literal["cosine", "linear"] | None = None
    diffusion_steps: int = 1000
    vlb_weight: float = 1.0
    class_dropout: float = 0.1
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    adam_beta2: float | None = None
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    max_grad_norm: float | None = None
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    max_nonfinite: int = 20
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    export_at: list[int] = field(default_factory=list)
    tokenizer: str | None = None
    cpu: bool = False

    def __post_init__(self) -> None:
        # folders may be given as Path, as pretokenize and from_pretrained take them; recorded as text
        for name in ("latents", "out", "tokenizer"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))

    def resolved(self, count: int | None = None) -> "GeneratorTrainConfig":
        """A copy with every ``None`` recipe field filled from the objective's recipe; given the
        latent set's ``count``, epochs become steps too (``steps`` / ``warmup_steps`` set).

        A length the user gave in steps or in epochs keeps the recipe's other unit out."""
        if self.objective not in RECIPES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(RECIPES)}")
        given = {k for k in RECIPES[self.objective] if getattr(self, k) is not None}
        for pair in LENGTHS:
            if any(getattr(self, k) is not None for k in pair):
                given |= set(pair)
        out = dataclasses.replace(self, **{k: v for k, v in RECIPES[self.objective].items() if k not in given})
        # the one not used is resolved too, as runs before these were optional recorded both
        out = dataclasses.replace(out, path=out.path or "cosine", schedule=out.schedule or "cosine")
        if count is not None:
            batch_size = out.batch_size
            assert batch_size is not None  # every recipe has one
            def in_steps(steps: int | None, epochs: float | None) -> int:
                return steps if steps is not None else math.ceil((epochs or 0) * count / batch_size)
            out = dataclasses.replace(out, steps=in_steps(out.steps, out.epochs),
                                      warmup_steps=in_steps(out.warmup_steps, out.warmup_epochs))
        return out

    def validate(self) -> "GeneratorTrainConfig":
        """Check every field (types and choices, ranges, what applies to the objective); returns ``self``."""
        # NaN or infinite settings would train on NaN or fail in torch: named as not finite (the range table
        # below would call NaN out of range and let inf pass), by their flags, before the type check.
        for name in ("lr", "weight_decay", "adam_beta2", "max_grad_norm", "vlb_weight", "class_dropout",
                     "ema_decay", "epochs", "warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{flag_name(name)} must be a finite number, got {value}")
        check_field_types(self)  # for a config built in Python: argparse checks the command line's
        if not self.latents:
            saved = Path(self.out) / "config.json"
            if recorded_run(saved) is not None:  # the CLI continues the run from it; from Python that is one call
                raise ValueError(f"no latents given; {saved} records the run's settings: continue it with "
                                 f"config_from_record(json.loads(Path({str(saved)!r}).read_text()), "
                                 f"out={str(self.out)!r}, steps=...) (softvq.generation.train_config), or on the "
                                 f"command line with --out {self.out}")
            if saved.is_file():  # the CLI would continue a run from it; this one is damaged or not a run's
                raise ValueError(f"no --latents given, and {saved} holds no train-generator run's settings to "
                                 f"continue with; pass --latents and the other flags")
            raise ValueError("no latent folder given; make one with `softvq pretokenize` and pass --latents")
        resolved = self.resolved()  # names an unknown objective
        # every recipe sets these (steps may wait for the latent set's count)
        assert (resolved.batch_size is not None and resolved.lr is not None and resolved.weight_decay is not None
                and resolved.adam_beta2 is not None)
        mar_only = [flag_name(name) for name in MAR_ONLY if getattr(self, name) not in (None, False)]
        if self.objective != "mar" and mar_only:
            raise ignored_flags(mar_only, "MAR (--objective mar)", reason="DiT and SiT have none")
        # given but unused would read as "it made no difference"
        if self.objective != "sit" and self.path is not None:
            name = {"dit": "DiT", "mar": "MAR"}.get(self.objective, self.objective)
            raise ValueError(f"--path (the interpolant) only applies to SiT; {name} takes a noise --schedule")
        if self.objective == "sit" and self.schedule is not None:
            raise ValueError("--schedule (the noise schedule) only applies to DiT and MAR; SiT takes an interpolant --path")
        for steps, epochs in LENGTHS:
            if getattr(self, steps) is not None and getattr(self, epochs) is not None:
                flags = " or ".join(flag_name(name) for name in (steps, epochs))
                raise ValueError(f"give {flags}, not both")
        r = resolved

        def at_least(source: Any, names: tuple[str, ...], low: float, what: str) -> list[tuple[str, Any, bool, str]]:
            return [(flag_name(n), getattr(source, n), getattr(source, n) is None or getattr(source, n) >= low, what)
                    for n in names]

        counts = ("width", "depth", "heads", "head_width", "head_depth", "buffer_size", "diffusion_batch_mul",
                  "diffusion_steps", "log_every", "checkpoint_every", "max_nonfinite")
        check_ranges([  # (flag, value, whether it holds, what the flag must be); None: the recipe's or unused
            *[(flag_name(n), getattr(r, n), getattr(r, n) is None or getattr(r, n) > 0, "positive")
              for n in ("steps", "epochs")],
            *at_least(r, ("warmup_steps", "warmup_epochs"), 0, "0 or more"),
            ("--batch-size", resolved.batch_size, resolved.batch_size >= 1, "1 or more"),
            *at_least(self, counts, 1, "1 or more"),
            *at_least(self, ("keep_checkpoints",), 0, "0 (keep all) or more"),
            ("--ema-decay", self.ema_decay, 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("--lr", resolved.lr, resolved.lr > 0, "positive"),
            *at_least(r, ("weight_decay", "max_grad_norm", "vlb_weight"), 0, "0 or more"),
            ("--adam-beta2 (AdamW's β2)", resolved.adam_beta2, 0.0 <= resolved.adam_beta2 < 1.0, "in [0, 1)"),
            ("--seed", self.seed, 0 <= self.seed < SEED_LIMIT, "0 or more and below 2**63"),
            ("--class-dropout (a probability)", self.class_dropout, 0.0 <= self.class_dropout < 1.0, "in [0, 1)"),
        ])
        if any(step < 1 for step in self.export_at):
            raise ValueError(f"--export-at takes steps of 1 or more, got {' '.join(map(str, self.export_at))}")
        # AdamW's first step, lr / (1 - β1) with β1 0.9, must fit a float32, or torch fails inside its step
        if resolved.lr / 0.1 >= torch.finfo(torch.float32).max:
            raise ValueError(f"--lr {resolved.lr:g} is too large for AdamW's float32 step; the recipes use 1e-4 "
                             f"and 2e-4")
        if resolved.lr * resolved.weight_decay >= 1:
            raise ValueError(f"--lr × --weight-decay must be below 1 (AdamW multiplies the weights by 1 - lr × "
                             f"weight decay each step), got {resolved.lr:g} × {resolved.weight_decay:g}")
        return self


MAR_ONLY = ("head_width", "head_depth", "buffer_size", "diffusion_batch_mul", "grad_checkpointing")
LENGTHS = (("steps", "epochs"), ("warmup_steps", "warmup_epochs"))  # one unit or the other

# Per-objective defaults: SoftVQ Sec. 4.1 (XL for 3M steps, MAR-H 500 epochs) and supp. C.2 (the
# rest); MAR's release for β2, clipping and what is not decayed.
_DIT_SIT = {"size": "XL", "steps": 3_000_000, "warmup_steps": 0, "batch_size": 256, "lr": 1e-4, "weight_decay": 0.0,
            "adam_beta2": 0.999, "max_grad_norm": 0.0}
RECIPES: dict[str, dict[str, Any]] = {
    "sit": dict(_DIT_SIT),
    "dit": dict(_DIT_SIT),
    "mar": {"size": "H", "epochs": 500, "warmup_epochs": 100, "batch_size": 2048, "lr": 2e-4, "weight_decay": 0.02,
            "adam_beta2": 0.95, "max_grad_norm": 3.0},
}


def build_model_config(cfg: GeneratorTrainConfig, num_tokens: int, latent_dim: int,
                       num_classes: int) -> GeneratorConfig | MARConfig:
    """The backbone config of a (resolved) run: a named size with the data's layout and overrides."""
    fields: dict[str, Any] = {"num_tokens": num_tokens, "latent_dim": latent_dim, "num_classes": num_classes,
                              "class_dropout": cfg.class_dropout}
    names = ("width", "depth", "heads") + (MAR_ONLY if cfg.objective == "mar" else ())
    fields.update({name: getattr(cfg, name) for name in names if getattr(cfg, name) is not None})
    assert cfg.size is not None  # every recipe names one
    if cfg.objective == "mar":
        return mar_config(cfg.size, schedule=cfg.schedule, diffusion_steps=cfg.diffusion_steps, **fields)
    return generator_config(cfg.objective, cfg.size, **fields)


# What a rerun may change when it continues a run: how long it trains, how often it logs and
# saves, where the folders are now, and the device. Anything else would make a run that no
# uninterrupted run makes.
CHANGEABLE_ON_RESUME = ("out", "latents", "steps", "epochs", "log_every", "checkpoint_every", "keep_checkpoints",
                        "export_at", "cpu", "max_nonfinite")


def recorded_train(cfg: GeneratorTrainConfig) -> dict[str, Any]:
    """``cfg`` as config.json records it: ``size`` null when the flags override everything it sets
    (the model section holds what was built), so "XL" is not read as the size of a 32-wide run, and
    ``latents`` absolute, as :func:`~softvq.checkpoint.specs.portable_spec` records tokenizer folders,
    so the file names its latent set from any working directory."""
    sized = ("width", "depth", "heads") + (("head_width", "head_depth") if cfg.objective == "mar" else ())
    record = dataclasses.asdict(cfg)
    record["latents"] = str(Path(cfg.latents).expanduser().resolve())
    if all(getattr(cfg, name) is not None for name in sized):
        record["size"] = None
    return record


def config_from_record(record: dict[str, Any], **given: Any) -> GeneratorTrainConfig:
    """The config a run's ``config.json`` records (its ``train`` section, :func:`recorded_train`,
    resolved; the whole file is taken too), with ``given``
    fields over it, such that resolving it again gives the record back: the lengths in the unit the
    run was given them in (a length in epochs also records its steps), a new ``steps`` or ``epochs``
    replacing the recorded pair, and only the noise setting of the objective (SiT's ``path``,
    DiT's and MAR's ``schedule``; both are recorded)."""
    if is_run_config(record):  # the whole config.json: its "train" section holds the fields
        record = record["train"]
    fields = dict(record)
    for steps, epochs in LENGTHS:
        if fields.get(epochs) is not None:
            fields[steps] = None
        if steps in given or epochs in given:
            fields[steps] = fields[epochs] = None
    objective = given.get("objective", fields.get("objective"))
    fields["schedule" if objective == "sit" else "path"] = None
    return GeneratorTrainConfig(**{**fields, **given})


def recorded_run(file: Path) -> dict[str, Any] | None:
    """The train-generator run ``file`` (a run's config.json) records, or None where it is missing,
    damaged or another kind of config.json."""
    try:
        payload = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return payload if is_run_config(payload) else None
