"""Train a DiT, SiT or MAR on pre-extracted latent shards (``softvq pretokenize``).

The recipes of the paper's supp. C.2, chosen by ``objective`` (every field can be overridden):

* DiT / SiT: AdamW (β2 0.999), constant learning rate 1e-4, no weight decay, global batch 256,
  size XL for 3M steps (Sec. 4.1's main runs; its Tab. 3 runs are SiT-L for 400K: ``--size L
  --steps 400000``);
* MAR: AdamW with β = (0.9, 0.95), weight decay 0.02 (not on biases and norms), maximum
  learning rate 2e-4 ("a higher learning rate leads to NaN"), a 100-epoch linear warm-up then
  constant, 500 epochs in all (epochs of the latent set, turned into steps at the start of a run),
  gradient clipping at 3.0 (MAR's release), global batch 2048, size H;

and for all: EMA of the weights (decay 0.9999) used for sampling, class-label dropout 0.1,
latents normalised as (z − mean) / std. The loop runs under ``accelerate`` (CPU, one or many
GPUs, optional bf16), keeps an EMA (``softvq.training.ema``), writes atomic resumable
checkpoints every ``checkpoint_every`` steps (``softvq.training.checkpointing``: model, EMA,
optimizer, step and RNG states; batches are a function of (seed, step, rank), so a resumed run
continues exactly), shows a progress bar, and appends one JSON line per ``log_every`` steps to
``log.jsonl``. Ctrl-C or SIGTERM finishes the step and writes a checkpoint before stopping
(``softvq.training.stopping``). A step with a non-finite loss or gradient is skipped; after
``max_nonfinite`` of them the run stops with :class:`~softvq.training.stopping.NonFiniteLossError`,
and non-finite weights are never saved. At the end the EMA weights are exported to ``RUN/generator``
for ``softvq generate``, and at each step of ``export_at`` to ``RUN/generator-step-NNNNNNNN``
(supp. Tab. 9 / arXiv Tab. 8: gFID and IS at 400K, 1M, 2M, 3M and 4M steps of one run), which
``keep_checkpoints`` never deletes.

The command line is ``softvq train-generator`` (:mod:`softvq.cli.train_generator`, one flag per
field of :class:`GeneratorTrainConfig`); from Python:

    from softvq.generation.train import GeneratorTrainConfig, train_generator
    train_generator(GeneratorTrainConfig(latents="runs/latents", out="runs/sit-tiny", objective="sit",
                                         width=128, depth=4, heads=4, steps=300, batch_size=32))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from softvq.atomic import write_json
from softvq.checkpoint.pretrained import load_strict
from softvq.checkpoint.specs import looks_like_hub_id
from softvq.typed_config import check_field_types, check_ranges
from softvq.generation.checkpoint import (GENERATOR_EXPORT, MODEL_CONFIG_KEY, folder_kind, is_run_config, milestone_export,
                                         run_meta, save_generator)
from softvq.generation.mar import MARConfig, mar_config
from softvq.generation.models import GeneratorConfig, build_generator, generator_config
from softvq.generation.objective import GenerationObjective, GenerationObjectiveConfig
from softvq.generation.latents import LatentSet, latent_set_sha1, load_latents
from softvq.randomness import SEED_LIMIT, derived_seed
from softvq.resume import changed_settings
from softvq.training.logging import RunLogger
from softvq.training.optim import param_groups
from softvq.training.schedule import lr_factor
from softvq.training.stopping import NonFiniteLossError, StopRequests, on_any_process

_LOG = logging.getLogger(__name__)  # the CLI prints its warnings as "softvq: warning: ..."


def flag_name(field: str) -> str:
    """The ``train-generator`` flag of a :class:`GeneratorTrainConfig` field: ``batch_size`` is
    ``--batch-size`` (errors name fields by their flags)."""
    return "--" + field.replace("_", "-")


@dataclass
class GeneratorTrainConfig:
    """Everything a generator run needs; written resolved to ``RUN/config.json`` (a rerun that
    continues the run updates it: :func:`record_continuation`). Each field is the
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
            if saved.is_file():  # the CLI continues a run from it; this one is damaged or not a run's
                raise ValueError(f"no --latents given, and {saved} holds no train-generator run's settings to "
                                 f"continue with; pass --latents and the other flags (from Python, continue a "
                                 f"run with softvq.generation.train.config_from_record)")
            raise ValueError("no latent folder given; make one with `softvq pretokenize` and pass --latents")
        resolved = self.resolved()  # names an unknown objective
        # every recipe sets these (steps may wait for the latent set's count)
        assert (resolved.batch_size is not None and resolved.lr is not None and resolved.weight_decay is not None
                and resolved.adam_beta2 is not None)
        mar_only = [flag_name(name) for name in MAR_ONLY if getattr(self, name) not in (None, False)]
        if self.objective != "mar" and mar_only:
            raise ValueError(f"{', '.join(mar_only)} only appl{'ies' if len(mar_only) == 1 else 'y'} to MAR "
                             f"(--objective mar); DiT and SiT have none")
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
                  "diffusion_steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite")
        check_ranges([  # (flag, value, whether it holds, what the flag must be); None: the recipe's or unused
            *[(flag_name(n), getattr(r, n), getattr(r, n) is None or getattr(r, n) > 0, "positive")
              for n in ("steps", "epochs")],
            *at_least(r, ("warmup_steps", "warmup_epochs"), 0, "0 or more"),
            ("--batch-size", resolved.batch_size, resolved.batch_size >= 1, "1 or more"),
            *at_least(self, counts, 1, "1 or more"),
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


def tokenizer_spec(spec: str, latent_shape: tuple[int, ...] | None = None) -> str:
    """``--tokenizer`` checked now, not when ``generate`` first loads it after a long run, and
    recorded as :func:`softvq.checkpoint.specs.portable_spec` does (a local folder made absolute).
    A preset or local folder whose latents are not ``latent_shape`` (L, D) is refused too."""
    from softvq.checkpoint.pretrained import CONFIG_NAME, training_run_export
    from softvq.checkpoint.specs import OFFICIAL_PREFIX, is_preset, portable_spec
    from softvq.config import PRESETS

    def same_shape(config: dict[str, Any]) -> str:
        shape = (config.get("num_tokens"), (config.get("bottleneck") or {}).get("latent_dim"))
        if latent_shape is not None and shape != tuple(latent_shape):
            raise ValueError(f"--tokenizer {spec} makes {shape} latents but the latent set holds {tuple(latent_shape)}; "
                             f"pass the tokenizer pretokenize used (its meta.json names it)")
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
        raise ValueError(f"--tokenizer {spec} is {what.get(kind, 'not a softvq tokenizer folder')}; pass the "
                         f"tokenizer that decodes the latents: {kinds}")
    text = spec.strip()
    if looks_like_hub_id(text):  # generate downloads it
        return spec
    raise ValueError(f"--tokenizer {spec!r} is not {kinds}")


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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every matrix and embedding, not on biases and norm scales (1-D tensors),
    as MAE / MAR do; with ``weight_decay`` 0 (DiT / SiT) this is plain AdamW."""
    return param_groups(model.named_parameters(), weight_decay, no_decay_names=())


def learning_rate(cfg: GeneratorTrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 gets lr/warmup), then constant."""
    assert cfg.lr is not None  # a resolved config
    return cfg.lr * lr_factor(step, total_steps=cfg.steps or 1, warmup_steps=cfg.warmup_steps or 0, kind="constant")


def _batch_indices(count: int, batch: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """The batch of a (seed, step, rank): independent of how the run was interrupted, and of the
    Python version (:func:`softvq.randomness.derived_seed`)."""
    g = torch.Generator().manual_seed(derived_seed(seed, step, rank))
    return torch.randint(0, count, (batch,), generator=g)


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


def run_header(cfg: GeneratorTrainConfig, model: torch.nn.Module, model_cfg: Any, data: LatentSet, acc: Any,
               start: int) -> str:
    """The lines a run starts with: what is trained, on what, where and for how long (as ``softvq
    train`` says it), and for a recipe-sized model on a CPU, what a laptop run should take instead."""
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(map(str, data.latents.shape[1:]))
    lines = [f"run {cfg.out}: {cfg.objective.upper()}, width {model_cfg.width}, depth {model_cfg.depth}, "
             f"{model_cfg.heads} heads, {params / 1e6:.1f} M parameters; {len(data.latents)} latents of {shape}, "
             f"{len(data.classes)} class(es)",
             f"{acc.num_processes} process(es) on {acc.device.type} (mixed precision {cfg.mixed_precision}), "
             f"batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.steps} steps from step {start}"]
    if acc.device.type == "cpu" and params > 100e6 and start == 0:  # the recipes' XL / H: minutes a step
        smallest = "B" if cfg.objective == "mar" else "S"
        lines.append(f"note: {params / 1e6:.0f} M parameters is a GPU recipe; on a CPU try --size {smallest}, or "
                     f"--width 128 --depth 4 --heads 4 --steps 600 (README, Generation)")
    return "\n".join(lines)


def config_from_record(record: dict[str, Any], **given: Any) -> GeneratorTrainConfig:
    """The config a run's ``config.json`` records (:func:`recorded_train`, resolved), with ``given``
    fields over it, such that resolving it again gives the record back: the lengths in the unit the
    run was given them in (a length in epochs also records its steps), a new ``steps`` or ``epochs``
    replacing the recorded pair, and only the noise setting of the objective (SiT's ``path``,
    DiT's and MAR's ``schedule``; both are recorded)."""
    fields = dict(record)
    for steps, epochs in LENGTHS:
        if fields.get(epochs) is not None:
            fields[steps] = None
        if steps in given or epochs in given:
            fields[steps] = fields[epochs] = None
    objective = given.get("objective", fields.get("objective"))
    fields["schedule" if objective == "sit" else "path"] = None
    return GeneratorTrainConfig(**{**fields, **given})


def check_out_folder(run: Path) -> None:
    """``--out`` must be new, empty or a train-generator run (its config.json says so, or, where
    that file was lost, its checkpoints): training writes config.json and checkpoints into it, so any
    other folder would be overwritten (a tokenizer's or an export's config.json) or misread as a run."""
    from softvq.generation.latents import META_NAME
    from softvq.run_lock import LOCK_NAME, ensure_not_in_use
    from softvq.training.accelerator import first_launched_process
    from softvq.training.checkpointing import latest_checkpoint

    if run.is_file():
        raise NotADirectoryError(f"--out {run} is a file; pass a folder for the run")
    if first_launched_process():  # the others of a launch may look after their main process locked it
        ensure_not_in_use(run)  # a run still going: "in use", not what its files make it look like
    # half-written files of our own atomic writes (a process of a launched run may be writing config.json)
    # and a killed run's lock file are no content
    if not run.is_dir() or not [p for p in run.iterdir()
                                if not (p.name.startswith(".") and p.name.endswith(".tmp")) and p.name != LOCK_NAME]:
        return
    file = run / "config.json"
    try:
        payload, why = json.loads(file.read_text()), None
    except FileNotFoundError:
        payload, why = None, None
    except (OSError, ValueError) as exc:
        payload, why = None, f"is not valid JSON ({exc})"
    if is_run_config(payload):
        return
    fresh = "a new or empty folder as --out"
    kind = folder_kind(run)
    if (run / "config.yaml").is_file() or kind == "tokenizer run":
        raise ValueError(f"--out {run} is a tokenizer training run (softvq train's), not a train-generator run; "
                         f"pass {fresh}")
    if kind == "tokenizer":
        raise ValueError(f"--out {run} is a tokenizer, not a train-generator run: training would overwrite its "
                         f"config.json; pass {fresh}")
    if kind == "latent set":
        raise ValueError(f"--out {run} is a latent set ({META_NAME}, written by pretokenize), not a train-generator "
                         f"run; pass it as --latents and {fresh}")
    if kind == "generator":
        parent = folder_kind(run.parent) in ("generator run", "unfinished generator run")
        again = f", or its run {run.parent} to continue that run" if parent else ""
        raise ValueError(f"--out {run} is an exported generator, not a train-generator run: training would overwrite "
                         f"its config.json; pass {fresh}{again}")
    kept = latest_checkpoint(run) is not None
    if not file.exists():
        if kept:
            return  # a run whose config.json was lost: its last checkpoint's settings are checked instead
        raise ValueError(f"--out {run} is a folder that is not a train-generator run (no config.json of one, and no "
                         f"checkpoints); pass {fresh}")
    if why is None:
        why = (f"holds a {type(payload).__name__}, not a run's settings" if not isinstance(payload, dict)
               else "has no run settings (\"train\" and \"model\")")
    fix = ("restore it, or delete it to continue from the settings the run's checkpoints record, or pass a new --out "
           "to start a fresh run" if kept else f"pass {fresh}")
    raise ValueError(f"--out {run} is not a train-generator run: its {file.name} {why}; {fix}")


def run_record(state: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The run's settings as a checkpoint records them, in config.json's layout ({"model", "train",
    "latents_sha1"}; checkpoints before them hold the model alone, and before that nothing). A file
    that is no generator checkpoint is refused before any of it is loaded."""
    from softvq.checkpoint.pretrained import CheckpointError

    if not (isinstance(state, dict) and {"model", "ema", "step"} <= set(state)):
        raise CheckpointError(f"{checkpoint} is not a train-generator checkpoint; pass a new or empty folder as --out")
    return {key: state[name] for key, name in (("model", MODEL_CONFIG_KEY), ("train", "train"),
                                               ("latents_sha1", "latents_sha1")) if name in state}


def check_same_run(run: Path, saved: dict[str, Any], model: dict[str, Any], train: dict[str, Any],
                   latents_sha1: str) -> None:
    """A run folder resumes only the run it was started with: another generator, other training
    settings or another latent set than ``saved`` (config.json, or a checkpoint's :func:`run_record`)
    records is a clear error before any weights are loaded; what ``saved`` lacks is not compared."""
    from softvq.checkpoint.specs import portable_spec

    # every difference at once: naming one at a time makes the user rerun to find the next
    model_changed = changed_settings(saved["model"], model) if "model" in saved else []
    saved_train = dict(saved.get("train", train))
    if saved_train.get("tokenizer") and train.get("tokenizer") and \
            portable_spec(saved_train["tokenizer"]) == train["tokenizer"]:  # recorded before specs were absolute
        saved_train["tokenizer"] = train["tokenizer"]
    # size is compared as the model it built (above): runs before it could be null recorded "XL"
    changed = changed_settings(saved_train, train, ignore=(*CHANGEABLE_ON_RESUME, "size"))
    if saved.get("latents_sha1", latents_sha1) != latents_sha1:
        changed.append(f"latent set {saved_train.get('latents')!r} -> {train['latents']!r} (another meta.json)")
    if model_changed or changed:
        flags = ", ".join(flag_name(name) for name in CHANGEABLE_ON_RESUME[2:])
        changed = [c for c in changed if c not in model_changed]  # a width is in both records
        what = "; ".join(([f"another generator: {', '.join(model_changed)}"] if model_changed else []) + changed)
        raise ValueError(f"{run} was trained with other settings ({what}); a rerun continues it with the same ones "
                         f"(only {flags} may change), or pass a new --out to start a fresh run")


def saved_settings(run: Path, state: dict[str, Any], checkpoint: Path) -> list[dict[str, Any]]:
    """What a resume from ``checkpoint`` is checked against: the run's config.json (a run config:
    :func:`check_out_folder` saw to it) and the checkpoint's own record, so that a lost or replaced
    config.json neither lets other settings through nor brings another model's weights to
    ``load_state_dict``. The first is what config.json is rebuilt from when it was lost."""
    file = run / "config.json"
    records = [json.loads(file.read_text())] if file.is_file() else []
    own = run_record(state, checkpoint)
    if not records and "train" not in own:
        raise ValueError(f"{run} has no config.json, and its checkpoint {checkpoint.name} is from before checkpoints "
                         f"recorded the run's settings, so continuing it cannot be checked: restore {file}, or pass a "
                         f"new --out to start a fresh run")
    return records + [own]


def exported_step(export: Path) -> int | str | None:
    """The step ``export`` was written at; None where there is no export (or it is damaged), and
    ``"unknown"`` for one written before exports recorded their step. A run stopped between its
    last checkpoint and its export keeps an older export, which is then made again."""
    try:
        return json.loads((export / "config.json").read_text()).get("step", "unknown")
    except (OSError, json.JSONDecodeError):
        return None


def record_continuation(run: Path, cfg: GeneratorTrainConfig, start: int, saved: dict[str, Any]) -> None:
    """Bring ``RUN/config.json`` up to a rerun that continues the run from ``start``: ``train`` takes
    the settings a rerun may change as now given (``steps``: the length it now trains to) and
    ``export_at`` becomes every step asked for over the run's commands (the union; those reached are
    its generator-step-* folders); a rerun that changes ``steps`` is appended to ``continued`` as
    {"at_step", "from_steps", "to_steps"}, so the file says the run was lengthened and where.
    ``saved`` is config.json as read, or, where it was lost, the checkpoint's record it is rebuilt from."""
    file = run / "config.json"
    old, now = saved.get("train", {}), recorded_train(cfg)
    train = {**old, **{name: now[name] for name in CHANGEABLE_ON_RESUME}} if old else now
    train["export_at"] = sorted(set(old.get("export_at", [])) | set(cfg.export_at))
    continued = list(saved.get("continued", []))
    if old and old.get("steps") != cfg.steps:
        continued.append({"at_step": start, "from_steps": old.get("steps"), "to_steps": cfg.steps})
    updated = {**saved, "train": train, **({"continued": continued} if continued else {})}
    if updated != saved or not file.is_file():
        write_json(file, updated)


def tidy_run(run: Path, step: int) -> None:
    """Before a run (re)starts at ``step``: delete the half-written files a killed process left
    (checkpoints, as the tokenizer trainer does, and config.json or exports), and drop the
    ``log.jsonl`` records past ``step``, which the rerun logs again. Main process only."""
    from softvq.atomic import remove_stale_temporaries
    from softvq.training.checkpointing import remove_stale_checkpoint_temporaries
    from softvq.training.logging import drop_records_after

    removed = remove_stale_checkpoint_temporaries(run) + sum(
        remove_stale_temporaries(folder) for folder in [run, *run.glob(f"{GENERATOR_EXPORT}*")])
    if removed:
        print(f"removed {removed} half-written file{'s' if removed > 1 else ''} a killed process left in {run}",
              file=sys.stderr)
    drop_records_after(run / "log.jsonl", step)


def milestone_warnings(cfg: GeneratorTrainConfig, run: Path, start: int) -> list[str]:
    """What ``--export-at`` will not do: steps beyond the run's end, and steps a resumed run has
    passed without their export (given only now); the latter may still be in a checkpoint. (The
    step it resumes at is exported from the EMA it loads.)"""
    from softvq.training.checkpointing import checkpoint_path

    notes = []
    assert cfg.steps is not None  # resolved with the latent set's count
    for step in sorted(set(cfg.export_at)):
        if step > cfg.steps:
            notes.append(f"--export-at {step} is beyond the run's {cfg.steps} steps, so it is not exported; "
                         f"continue the run with --steps {step} or more to reach it")
        elif step < start and not milestone_export(run, step).is_dir():
            kept = checkpoint_path(run, step)
            where = (f"sample it from its checkpoint with `softvq generate {kept}`" if kept.is_file()
                     else "its checkpoint is not kept either")
            notes.append(f"--export-at {step}: the run is already at step {start}, past it, so it cannot be "
                         f"exported any more; {where}")
    return notes


def nonfinite_stop(cfg: GeneratorTrainConfig, run: Path, step: int, count: int | None) -> str:
    """Why a run stops at ``step`` on non-finite values (``count`` skipped steps, or None: weights),
    where its last good weights are and what to try. Nothing is written at the stop: the run keeps
    its settings, so continuing it would repeat the same steps."""
    from softvq.training.checkpointing import latest_checkpoint

    why = (f"{count} steps had a non-finite loss or gradient and were skipped (limit --max-nonfinite "
           f"{cfg.max_nonfinite})" if count is not None
           else "the weights became non-finite (a step with a finite loss moved them to infinity)")
    kept = latest_checkpoint(run)
    last = f"the last good weights are in {kept}" if kept is not None else "no checkpoint had been written yet"
    fp32 = ", --mixed-precision no" if cfg.mixed_precision != "no" else ""
    rare = "; if such steps are rare, continue this run with a higher --max-nonfinite" if count is not None else ""
    return (f"stopped at step {step}: {why}, and nothing was written; {last}. Start a new run (a new --out) with a "
            f"lower --lr, a warm-up (--warmup-steps), gradient clipping (--max-grad-norm){fp32}, or check the latent "
            f"set{rare}")


def refuse_nonfinite(tensors: list[torch.Tensor], cfg: GeneratorTrainConfig, run: Path, step: int) -> None:
    """Never save non-finite weights: skipped steps keep them finite, but a step with a finite loss
    can still move them to infinity (a huge --lr or --weight-decay)."""

    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFiniteLossError(nonfinite_stop(cfg, run, step, None))


def train_generator(cfg: GeneratorTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns {"first_loss", "last_loss", "steps", "export", "stopped"}
    (and ``"already_finished": True``, with no losses, when the run had already reached ``steps``).
    The losses are of the first and last step this call trained: after a resume, ``first_loss`` is
    the resumed step's, not step 1's (the run's whole curve is in its ``log.jsonl``).

    The first Ctrl-C or SIGTERM finishes the step, writes a checkpoint and returns with
    ``stopped`` True, ``steps`` the step reached and no export; calling again continues. It seeds
    torch's global random generator from ``seed`` (so that a run repeats exactly), and gives the
    global generators back their states when it returns.
    """
    from softvq.run_lock import lock_run_folder
    from softvq.training.checkpointing import capture_rng, restore_rng
    from softvq.training.accelerator import new_accelerator, said_by_main_process

    check_out_folder(Path(cfg.validate().out))  # before anything is read or written
    data = load_latents(cfg.latents)
    check_latent_set(data, cfg.latents)
    if cfg.tokenizer is not None:
        spec = tokenizer_spec(cfg.tokenizer, tuple(data.latents.shape[1:]))
        cfg = dataclasses.replace(cfg, tokenizer=spec)
        other = other_tokenizer(spec, data.meta)
        if other is not None:  # generate would say it only after the whole run
            _LOG.warning(f"--tokenizer {other}: generate would decode this run's samples with other weights than "
                         f"the latents were made with; pass the tokenizer pretokenize used, or leave --tokenizer out")
    cfg = cfg.resolved(count=data.latents.shape[0])  # epochs -> steps
    length = f"--epochs {cfg.epochs:g} ({cfg.steps} steps)" if cfg.epochs is not None else f"--steps {cfg.steps}"
    run = Path(cfg.out)
    # without CUDA a launched run must ask for CPU processes, or accelerate gives each one a run of its own
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if on_cpu and cfg.mixed_precision == "fp16":  # Accelerate has no fp16 autocast on a CPU: it trained in fp32
        raise ValueError("--mixed-precision fp16 needs a GPU (on a CPU it would train in float32 and record fp16); "
                         "pass --mixed-precision bf16 or no")
    acc = new_accelerator(mixed_precision=cfg.mixed_precision, cpu=on_cpu)
    if cfg.batch_size % acc.num_processes:  # each process takes batch / n: a remainder would be dropped unsaid
        raise said_by_main_process(ValueError(f"--batch-size {cfg.batch_size} must split evenly into "
                                              f"{acc.num_processes} processes; pass a multiple of {acc.num_processes}"),
                                   acc.is_main_process)  # every process finds it: the CLI says it once
    lock = lock_run_folder(run, acc)  # one process per run folder, for the run's whole life (main only)
    caller_rng = capture_rng()  # the run seeds the global generators; the caller gets its states back
    try:
        return _train(cfg, data, run, acc, length, progress)
    finally:
        lock.release()
        restore_rng(caller_rng)


def _train(cfg: GeneratorTrainConfig, data: LatentSet, run: Path, acc, length: str, progress: bool) -> dict[str, Any]:
    """The run itself, in the locked ``run`` folder (:func:`train_generator`)."""
    from tqdm.auto import tqdm

    from softvq.training.accelerator import gather_objects
    from softvq.training.checkpointing import capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint
    from softvq.training.resuming import restore_or_reseed_rng
    from softvq.training.ema import EMA

    torch.manual_seed(cfg.seed + acc.process_index)
    # resolved with the latent set's count: the recipe's fields and the lengths in steps are set
    assert (cfg.steps is not None and cfg.warmup_steps is not None and cfg.lr is not None
            and cfg.weight_decay is not None and cfg.adam_beta2 is not None and cfg.path is not None
            and cfg.schedule is not None)

    model_cfg = build_model_config(cfg, data.latents.shape[1], data.latents.shape[2], len(data.classes))
    model = build_generator(model_cfg)
    objective = GenerationObjective(
        GenerationObjectiveConfig(cfg.objective, cfg.path, cfg.schedule, cfg.diffusion_steps, cfg.vlb_weight),
        learned_sigma=getattr(model_cfg, "sigma_learned", True))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, cfg.adam_beta2))
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)

    # what generate needs besides the weights, in every checkpoint and export
    meta = run_meta(dataclasses.asdict(cfg), data.meta)
    # the run's settings as config.json and every checkpoint record them, and a resume checks them
    train_record, latents_sha1 = recorded_train(cfg), latent_set_sha1(data.meta)
    start = nonfinite = 0
    note: str | None  # printed for the user: warnings, and the random generators' state on a resume
    latest = latest_checkpoint(run)
    if latest is not None:
        state = load_checkpoint(latest)
        saved = saved_settings(run, state, latest)
        for record in saved:
            check_same_run(run, record, model_cfg.to_dict(), train_record, latents_sha1)
        load_strict(model, state["model"], str(latest))  # a mismatch left is named, not torch's traceback
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = int(state["step"])
        nonfinite = int(state.get("nonfinite_steps", 0))  # counted over the run, as the tokenizer trainer does
        if start > cfg.steps:
            raise ValueError(f"{run} is already at step {start}; {length} would train nothing "
                             f"(pass --steps above {start}, or more --epochs, to continue it)")
        if acc.is_main_process:
            tidy_run(run, start)
            record_continuation(run, cfg, start, saved[0])
            if start in cfg.export_at and not milestone_export(run, start).is_dir():
                # given only now: the EMA of this step is the one just loaded, and the loop will not pass it
                with ema.swapped_into(model):
                    save_generator(model, meta, milestone_export(run, start), step=start)
                print(f"exported the EMA generator of step {start} ({latest.name}) to {milestone_export(run, start)}",
                      file=sys.stderr)
        if start == cfg.steps and exported_step(run / GENERATOR_EXPORT) in (start, "unknown"):  # finished: leave it
            if acc.is_main_process:
                for note in milestone_warnings(cfg, run, start):  # --export-at given only now
                    _LOG.warning(note)
                print(f"{run} already finished at step {start}; pass --steps above {start} (or more --epochs) "
                      f"to train it further", file=sys.stderr)
            return {"first_loss": None, "last_loss": None, "steps": start, "export": str(run / GENERATOR_EXPORT),
                    "stopped": False, "already_finished": True}
        note = restore_or_reseed_rng(state["rng"], rank=acc.process_index, world=acc.num_processes, seed=cfg.seed,
                                     step=start)
        if note is not None and acc.is_main_process:
            print(note, file=sys.stderr)
        if acc.is_main_process and start == cfg.steps:
            old = exported_step(run / GENERATOR_EXPORT)
            print(f"{run} trained to step {start}; its export is {'missing' if old is None else f'from step {old}'}"
                  f": exporting again", file=sys.stderr)
        elif acc.is_main_process:
            print(f"resuming {run} from step {start} ({latest.name})", file=sys.stderr)
    elif acc.is_main_process:
        if cfg.warmup_steps >= cfg.steps:  # e.g. MAR's 100-epoch recipe warm-up under a short --steps
            warm = (f"--warmup-epochs {cfg.warmup_epochs:g}" if cfg.warmup_epochs is not None
                    else f"--warmup-steps {cfg.warmup_steps}")
            _LOG.warning(f"the learning-rate warm-up ({warm}: {cfg.warmup_steps} steps) is not shorter than the run "
                         f"({length}), so the lr never reaches its peak {cfg.lr:g}; pass a shorter --warmup-steps "
                         f"or --warmup-epochs")
        tidy_run(run, 0)  # a run killed before its first checkpoint starts again
        run.mkdir(parents=True, exist_ok=True)
        resolved = {"train": train_record, "model": model_cfg.to_dict(), "latents_sha1": latents_sha1}
        write_json(run / "config.json", resolved)

    if acc.is_main_process:
        for note in milestone_warnings(cfg, run, start):
            _LOG.warning(note)
        print(run_header(cfg, model, model_cfg, data, acc, start), file=sys.stderr)
    model, optimizer = acc.prepare(model, optimizer)
    latents = (data.latents - data.mean) / data.std  # (z - mean) / std, supp. C.2 / the release
    labels = data.labels
    per_process = cfg.batch_size // acc.num_processes
    log = RunLogger(run, enabled=acc.is_main_process, tensorboard=False)  # log.jsonl, as the tokenizer trainer's
    first_loss = math.nan
    last_loss: float | torch.Tensor = math.nan  # the last step's loss, read from the device at the end
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.objective}",
               disable=not (progress and acc.is_main_process))
    tick, ticked_at = time.perf_counter(), start
    model.train()
    say = (lambda text: print(text, file=sys.stderr)) if acc.is_main_process else (lambda text: None)
    stop = StopRequests(lambda name: say(f"received {name}: stopping after this step with a checkpoint "
                                         f"(Ctrl-C again to stop at once)")).install()
    stopped_at = None
    try:
        for step in bar:
            idx = _batch_indices(len(latents), per_process, cfg.seed, step, acc.process_index)
            x, y = latents[idx], labels[idx]
            if acc.device.type == "cuda":  # pinned, so the copy need not wait for the steps still queued
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with acc.autocast():
                terms = objective(model, x, y)
            acc.backward(terms["loss"])
            # A non-finite loss gives non-finite gradients, so their norm (computed when clipping anyway)
            # tells a step to skip. Under fp16 the grad scaler's step skips overflowing gradients itself
            # (and lowers its scale): overflow is routine there, so only the loss counts.
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            finite = torch.isfinite(terms["loss"].detach())
            if cfg.mixed_precision != "fp16":
                finite = finite & torch.isfinite(grad_norm)
            # Reading it waits for the device once a step, as the tokenizer trainer does. With several
            # processes they agree on it (a loss may be non-finite on one alone) and on a stop
            # request, so that every process skips and stops at the same step.
            bad = not bool(finite)
            stopping = stop.requested
            if acc.num_processes > 1:
                bad, stopping = on_any_process([bad, stopping], acc.device)
            if not bad or cfg.mixed_precision == "fp16":
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if bad:
                nonfinite += 1
                say(f"step {done}: non-finite loss or gradient, step skipped ({nonfinite}/{cfg.max_nonfinite})")
                if nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteLossError(nonfinite_stop(cfg, run, done, nonfinite))
            else:
                ema.update(acc.unwrap_model(model))
            last_loss = terms["loss"].detach()
            if step == start:
                first_loss = float(last_loss)
            if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps):
                elapsed = time.perf_counter() - tick
                record = {**{k: float(v.detach()) for k, v in terms.items()}, "lr": lr,
                          # the steps since the last line: fewer than log_every at the end and after a resume
                          "ema_decay": ema.current_decay(), "sec_per_step": elapsed / (done - ticked_at),
                          "nonfinite_steps": nonfinite}
                bar.set_postfix(loss=f"{record['loss']:.4f}")  # "nan" / "inf" for a skipped step
                log.scalars(done, record, echo=False)  # non-finite values as text: strict JSON has no NaN
                tick, ticked_at = time.perf_counter(), done
            if done in cfg.export_at:  # before the checkpoint: a resume past it has it
                refuse_nonfinite(ema.shadow, cfg, run, done)  # on every process: all stop together
                if acc.is_main_process:
                    unwrapped = acc.unwrap_model(model)
                    with ema.swapped_into(unwrapped):
                        save_generator(unwrapped, meta, milestone_export(run, done), step=done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                rngs = gather_objects(capture_rng(), acc.num_processes)  # each process's own stream
                unwrapped = acc.unwrap_model(model)
                refuse_nonfinite([*unwrapped.parameters(), *ema.shadow], cfg, run, done)
                if acc.is_main_process:
                    save_checkpoint({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                                     "ema": ema.state_dict(), "step": done, "rng": rngs, "meta": meta.to_dict(),
                                     "nonfinite_steps": nonfinite, MODEL_CONFIG_KEY: model_cfg.to_dict(),
                                     # loads, and resumes with its settings checked, without config.json
                                     "train": train_record, "latents_sha1": latents_sha1},
                                    run, done, keep=cfg.keep_checkpoints)
            if stopping and done < cfg.steps:
                stopped_at = done
                break
    finally:
        stop.restore()
        log.close()
    if stopped_at is not None:
        bar.close()
        say(f"stopped at step {stopped_at} with a checkpoint; run the same command again to continue")
        return {"first_loss": first_loss, "last_loss": float(last_loss), "steps": stopped_at, "export": None,
                "stopped": True}
    bar.close()
    acc.wait_for_everyone()
    export = run / GENERATOR_EXPORT
    refuse_nonfinite(ema.shadow, cfg, run, cfg.steps)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        with ema.swapped_into(unwrapped):
            save_generator(unwrapped, meta, export, step=cfg.steps)
    return {"first_loss": first_loss, "last_loss": float(last_loss), "steps": cfg.steps, "export": str(export),
            "stopped": False}
