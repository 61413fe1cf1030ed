"""The typed configuration of a training run, read from YAML with ``key=value`` overrides.

A run is described by one :class:`TrainConfig` tree::

    model:      a TokenizerConfig (optionally ``preset: softvq-s-64`` plus field overrides)
    objective:  the ObjectiveConfig of ``softvq.losses.objective`` (paper Eq. 7 weights)
    data:       where images come from and how they are augmented      (DataConfig)
    optim:      optimizers, learning rate, gradient clipping             (OptimConfig)
    schedule:   steps, warm-up, batch, accumulation, EMA, precision      (ScheduleConfig)
    run:        output folder, logging / checkpoint / grid cadence       (RunConfig)

Defaults are the paper's recipe (Sec. 4.1 / supplementary C.1): 250k iterations at batch 256,
AdamW (β 0.9/0.95, weight decay 1e-4), lr 1e-4 scaled by batch/256, cosine decay after a 5k-step
linear warm-up; the paper is silent on the rest, which comes from the released recipe: gradient
clipping 1.0, EMA 0.9999, bf16 on GPU (the paper names bf16 for its generators only).

YAML files may start with ``inherit: other.yaml`` (a path relative to the file, or the name of a
bundled config); the child's keys are merged over the parent's. Unknown keys anywhere are an error
that names the full dotted key. :func:`save_config` writes the fully resolved tree, which
:func:`load_config` reads back to the same object.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from softvq.checkpoint.specs import OFFICIAL_PREFIX
from softvq.config import CODEBOOK_KINDS, TokenizerConfig, preset
from softvq.typed_config import check_ranges, strict_fields
from softvq.randomness import SEED_LIMIT
from softvq.losses.objective import ObjectiveConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "demo"


@dataclass
class DataConfig:
    """Training and held-out images.

    source:
        ``bundled``: random crops of the photos shipped in scikit-image / scikit-learn (the
        embedded default); ``folder``: every image under ``path`` (recursive, unreadable files
        skipped and counted); ``shards``: webdataset tar shards matching ``path`` (brace
        patterns like ``train-{000000..000146}.tar``). A relative ``path`` or ``eval_path`` is
        written absolute into the run's ``config.yaml`` (:func:`anchor_paths`).
    eval_path:
        folder of held-out images for grids and metrics. ``None``: the ``holdout`` photos for
        ``bundled``, ``num_eval_images`` files of the folder chosen by a fixed shuffle (excluded
        from training) for ``folder``, and the bundled held-out photos for ``shards``.
    image_size:
        training resolution; ``None`` takes the model's.
    holdout:
        bundled photos (file stems) never trained on; they give the held-out crops.
    min_crop_fraction:
        the random crop of LlamaGen (and ADM), the codebase paper Sec. 4.1 trains with: the
        shorter side is resized to size / U(min_crop_fraction, 1) and a size x size window is
        cut at random.
    bundled_scales:
        for ``bundled``: crop sides as fractions (min, max) of the photo's shorter side, drawn
        log-uniformly, then resized to ``image_size`` (random crops at several scales).
    bundled_crops_per_photo:
        how many draws make one "epoch" of the bundled set (it is an endless stream).
    """

    source: Literal["bundled", "folder", "shards"] = "bundled"
    path: str | None = None
    eval_path: str | None = None
    image_size: int | None = None
    holdout: list[str] = field(default_factory=lambda: ["chelsea", "china"])
    num_eval_images: int = 16
    hflip: bool = True
    min_crop_fraction: float = 0.8
    bundled_scales: list[float] = field(default_factory=lambda: [0.2, 1.0])
    bundled_crops_per_photo: int = 64
    workers: int = 2
    prefetch_factor: int = 2


@dataclass
class OptimConfig:
    """Optimizers (supplementary C.1).

    name:
        ``adamw`` (the paper: decoupled weight decay, none on norms, biases, embeddings,
        position embeddings, latent/mask tokens, codebooks and temperatures) or ``adam`` (the
        released code: torch Adam, weight decay added to the gradient of every parameter).
    lr:
        peak learning rate at a global batch of 256; with ``scale_lr`` it is multiplied by
        global_batch / 256 (paper: 1e-4).
    grad_clip:
        maximum global gradient norm (the released recipe: 1.0; the paper gives none); ``0`` or
        ``None`` turns clipping off.
    disc_lr / disc_betas / disc_weight_decay:
        the discriminator's own optimizer; ``None`` copies the tokenizer's values.
    """

    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-4
    scale_lr: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    disc_lr: float | None = None
    disc_betas: list[float] | None = None
    disc_weight_decay: float | None = None


@dataclass
class ScheduleConfig:
    """How long, how big, how precise.

    steps:           optimizer steps (paper: 250k).
    batch_size:      GLOBAL images per optimizer step over all processes and accumulation.
    grad_accum:      micro-batches per optimizer step on each process.
    warmup_steps:    linear warm-up from 0 to the peak lr (paper: 5k).
    lr_schedule:     ``cosine`` decay to ``min_lr_ratio`` x peak after warm-up, or ``constant``.
    ema_decay:       EMA of the tokenizer weights used for evaluation and export (the released
                     recipe: 0.9999; the paper gives none).
    ema_warmup:      use min(ema_decay, (1 + n) / (10 + n)) after n updates so short runs get a
                     useful average (TensorFlow's ExponentialMovingAverage num_updates rule).
    precision:       ``auto`` = bf16 autocast on GPU, fp32 on CPU; or force ``bf16`` / ``fp32``.
    seed:            model initialisation, data order, augmentations and loss randomness.
    """

    steps: int = 250_000
    batch_size: int = 256
    grad_accum: int = 1
    warmup_steps: int = 5_000
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0


@dataclass
class RunConfig:
    """Where results go and how often things happen (all cadences in optimizer steps; 0 = never).

    output:           run folder; ``None`` -> ``runs/<name>``.
    keep_checkpoints: how many checkpoints stay on disk (0 keeps them all).
    max_nonfinite:    the run stops with an error after this many skipped non-finite steps.
    max_minutes:      stop cleanly (checkpoint, export, metrics) after this much wall time.
    grid_every:       steps between held-out grids (``grids/``, the first ``grid_images`` held-out
                      images) and the EMA weights' held-out PSNR / LPIPS in the log (``heldout/*``).
    eval_lpips:       also compute held-out LPIPS (VGG) at each grid and at the end.
    distributed:      ``ddp`` or ``fsdp`` (full sharding through Accelerate, for L-size presets).
    init_from:        a softvq tokenizer folder or hub id (e.g. a finished run's ``export/``), a
                      run's checkpoint ``RUN/checkpoints/step-N.pt`` (its EMA weights), or
                      ``official:FOLDER_OR_ID`` (a released SoftVQ-VAE checkpoint), whose weights
                      start this run. With a larger ``model.decoder_noise_dim`` than it
                      has, the new noise inputs start at zero: WeTok's stage 2, the generative
                      decoder (WeTok Sec. 3.3). Ignored when resuming (the checkpoint wins).
    init_encoder:     DINO / DINOv2 weights the encoder starts from (paper Sec. 4.1: "we initialize
                      our encoder from the pre-trained DINOv2 weights"; Tab. 4 ablates it): a file,
                      a torch-hub name (``dinov2_vitb14``), a Hugging Face id, or ``dinov2`` for the
                      DINOv2 of the encoder's width (384: ViT-S/14, 768: B/14, 1024: L/14). ``None``:
                      random initialisation. Ignored when resuming.
    freeze:           parts of the tokenizer that do not train: any of ``encoder`` (with its
                      projection to the latents), ``bottleneck``, ``decoder`` (with its projection
                      from the latents). WeTok's released stage 2 freezes ``[encoder, bottleneck]``
                      and trains the generative decoder alone; the paper does not say (Sec. 3.3).
    """

    name: str = "softvq"
    output: str | None = None
    log_every: int = 50
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    grid_every: int = 5_000
    grid_images: int = 8
    max_nonfinite: int = 20
    max_minutes: float | None = None
    eval_lpips: bool = True
    tensorboard: bool = True
    progress: bool = True
    distributed: Literal["ddp", "fsdp"] = "ddp"
    init_from: str | None = None
    init_encoder: str | None = None
    freeze: list[str] = field(default_factory=list)


FREEZABLE = ("encoder", "bottleneck", "decoder")


@dataclass
class TrainConfig:
    """Everything a training run needs; see the module docstring."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model_preset: str | None = None

    @property
    def image_size(self) -> int:
        """The training resolution: ``data.image_size``, else the model's."""
        return self.data.image_size or self.model.image_size

    def validate(self) -> "TrainConfig":
        """Check every section's ranges and their agreement; returns ``self``. Errors name the key."""
        s, o, d, r = self.schedule, self.optim, self.data, self.run
        ranges = [  # (key, value, whether it holds, what the key must be)
            # an empty name made runs/ itself the run folder (then ./-2 beside it)
            ("run.name", r.name, bool(r.name.strip()) and "/" not in r.name and r.name not in (".", ".."),
             "a folder name under runs/ (not empty, no '/'; -o chooses any folder)"),
            ("schedule.steps", s.steps, s.steps >= 1, "positive"),
            ("schedule.batch_size", s.batch_size, s.batch_size >= 1, "positive"),
            ("schedule.grad_accum", s.grad_accum, s.grad_accum >= 1, "positive"),
            ("schedule.ema_decay", s.ema_decay, 0.0 <= s.ema_decay < 1.0, "in [0, 1)"),
            ("schedule.warmup_steps", s.warmup_steps, s.warmup_steps >= 0, "0 or more"),
            ("schedule.min_lr_ratio", s.min_lr_ratio, 0.0 <= s.min_lr_ratio <= 1.0, "in [0, 1]"),
            # NumPy refuses negative seeds and torch ones past 64 bits, at the first step: after the
            # run folder was made (seed + 1 + rank seeds each process)
            ("schedule.seed", s.seed, 0 <= s.seed < SEED_LIMIT, "0 or more and below 2**63"),
            ("optim.lr", o.lr, o.lr > 0, "positive"),
            ("optim.disc_lr", o.disc_lr, o.disc_lr is None or o.disc_lr > 0, "positive or null"),
            ("optim.eps", o.eps, o.eps > 0, "positive"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "0 or more"),
            ("optim.disc_weight_decay", o.disc_weight_decay, (o.disc_weight_decay or 0) >= 0, "0 or more, or null"),
            # a negative clip would flip the gradient's sign inside torch: gradient ascent
            ("optim.grad_clip", o.grad_clip, o.grad_clip is None or o.grad_clip >= 0,
             "positive, or 0 / null for no clipping"),
            ("data.workers", d.workers, d.workers >= 0, "0 or more"),
            ("data.image_size", d.image_size, d.image_size is None or d.image_size >= 1, "positive, or null (the model's)"),
            ("data.num_eval_images", d.num_eval_images, d.num_eval_images >= 1, "1 or more"),
            ("data.bundled_crops_per_photo", d.bundled_crops_per_photo, d.bundled_crops_per_photo >= 1, "1 or more"),
            ("data.prefetch_factor", d.prefetch_factor, d.prefetch_factor >= 1, "1 or more"),
            ("data.min_crop_fraction", d.min_crop_fraction, 0.0 < d.min_crop_fraction <= 1.0, "in (0, 1]"),
            *[(f"run.{name}", getattr(r, name), getattr(r, name) >= 0, "0 or more (0 turns it off)")
              for name in ("log_every", "checkpoint_every", "keep_checkpoints", "grid_every", "grid_images",
                           "max_nonfinite")],
            ("run.max_minutes", r.max_minutes, r.max_minutes is None or r.max_minutes > 0, "positive or null"),
        ]
        check_ranges(ranges)
        if r.init_from and r.init_encoder:  # here, so that `softvq info` finds it before a run is made
            raise ValueError("run.init_from and run.init_encoder both set: init_from already brings an encoder; drop "
                             "one of them (run.init_encoder=null: the SoftVQ presets start from DINOv2)")
        if unknown := [part for part in r.freeze if part not in FREEZABLE]:
            raise ValueError(f"run.freeze names {unknown[0]!r}; the parts are {', '.join(FREEZABLE)}")
        if len(set(r.freeze)) != len(r.freeze):
            raise ValueError(f"run.freeze names a part twice ({r.freeze}); name each once")
        weightless = self.model.bottleneck.kind not in CODEBOOK_KINDS  # nothing of its own to train or freeze
        if set(FREEZABLE) <= set(r.freeze) or (weightless and {"encoder", "decoder"} <= set(r.freeze)):
            raise ValueError(f"run.freeze={r.freeze} leaves nothing of the tokenizer to train"
                             f"{' (a ' + self.model.bottleneck.kind + ' bottleneck has no weights)' if weightless else ''}"
                             f"; drop one")
        if "encoder" in r.freeze and not (r.init_from or r.init_encoder):
            raise ValueError("run.freeze=[encoder, ...] would keep the encoder at its random initialisation: set "
                             "run.init_from (a trained tokenizer, e.g. a stage-1 export) or run.init_encoder")
        if "bottleneck" in r.freeze and not weightless and not r.init_from:
            raise ValueError("run.freeze=[bottleneck, ...] would keep the codebook at its random initialisation: set "
                             "run.init_from (a trained tokenizer, e.g. a stage-1 export)")
        if "decoder" in r.freeze and self.objective.adaptive_weight:
            raise ValueError("objective.adaptive_weight compares gradients at the decoder's last layer, which "
                             "run.freeze=[..., decoder] freezes; turn one of them off")
        if r.freeze and r.distributed == "fsdp":
            raise ValueError("run.freeze with run.distributed=fsdp is not supported (FSDP shards frozen and trained "
                             "weights together); use run.distributed=ddp")
        for name in ("betas", "disc_betas"):
            betas = getattr(o, name)
            if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
                raise ValueError(f"optim.{name} needs two numbers in [0, 1), got {betas}")
        try:  # first: the checks below divide by its sizes
            self.model.validate()
        except (TypeError, ValueError) as exc:  # its messages name keys inside the model section
            raise type(exc)(_in_model_section(str(exc))) from None
        if self.data.source != "bundled" and not self.data.path:
            raise ValueError(f"data.source={self.data.source} needs data.path (a folder or shard pattern)")
        if self.image_size % self.model.patch_size:
            raise ValueError(
                f"data.image_size {self.image_size} is not a multiple of model.patch_size {self.model.patch_size}"
            )
        lo, hi = self.data.bundled_scales
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.bundled_scales must satisfy 0 < min <= max <= 1, got {self.data.bundled_scales}")
        self.objective.validate()
        self.objective.check_bottleneck(self.model.bottleneck)  # a weight no loss of the model reads
        self._check_discriminator_fits()
        self._check_alignment_fits()
        return self

    def _check_alignment_fits(self) -> None:
        """Eq. 5 repeats each of the L latent tokens N/L times to meet the N image patches: a token
        count that does not divide N fails here, not at the first step."""
        if self.objective.alignment_weight <= 0:
            return
        side, patch, tokens = self.image_size, self.model.patch_size, self.model.num_tokens
        if (side // patch) ** 2 % tokens == 0:
            return
        fits = next((s for s in range(side + patch, 64 * side, patch) if (s // patch) ** 2 % tokens == 0), None)
        raise ValueError(f"objective.alignment_weight > 0 repeats each of the model.num_tokens={tokens} latent "
                         f"tokens over the {(side // patch) ** 2} patches of a {side} px image (Eq. 5), which "
                         f"needs a multiple of {tokens}: use "
                         + (f"model.image_size={fits}, " if fits else "another model.image_size, ")
                         + "fewer tokens, or objective.alignment_weight=0")

    def _check_discriminator_fits(self) -> None:
        """Images too small for the convolutional discriminators fail when the config is read, not at
        the first discriminator step (``discriminator_start``: step 20,000 in the release's recipe)."""
        obj = self.objective
        if obj.adversarial_weight <= 0:
            return
        kind = obj.discriminator
        if kind == "auto":
            kind = "dino" if obj.discriminator_weights else "vgg"
        if kind == "patchgan":
            from softvq.losses.discriminators import PatchGAN

            need = PatchGAN(width=1).min_side
        else:
            need = 16 if kind == "vgg" else 1  # VGG pools four times; DINO resizes its input to 224
        if self.image_size < need:
            raise ValueError(f"objective.discriminator {kind} needs images of at least {need} px, but they are "
                             f"{self.image_size} px: use a larger model.image_size, another "
                             f"objective.discriminator, or objective.adversarial_weight=0")

    def own_model_keys(self) -> set[str]:
        """The ``model`` keys (dotted) this config sets to other values than its preset's (or the
        defaults', without a preset): those a ``model.preset=`` override leaves as they are."""
        from softvq.resume import differences

        base = preset(self.model_preset) if self.model_preset else TokenizerConfig()
        return {key for key, _, _ in differences(base.to_dict(), self.model.to_dict())}

    def unread_model_keys(self) -> list[str]:
        """The ``model.bottleneck`` keys this config sets (against its preset, as
        :meth:`own_model_keys`) that its bottleneck kind never reads: ``temperature`` with
        ``kind: kl``, say. A preset's own values for them are not named: switching a released
        SoftVQ preset to ``kind: kl`` leaves its cosine distance unread, by no choice of the user."""
        from softvq.bottlenecks.factory import unread_settings

        unread = {f"bottleneck.{name}" for name in unread_settings(self.model.bottleneck)}
        return sorted(f"model.{key}" for key in self.own_model_keys() & unread)

    def to_dict(self) -> dict[str, Any]:
        """The config as a nested dict, with ``model.preset`` first where one was named."""
        out = dataclasses.asdict(self)
        preset_name = out.pop("model_preset")
        if preset_name:
            out["model"] = {"preset": preset_name, **out["model"]}
        return out


# --- reading ----------------------------------------------------------------------------------


def find_config(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the name of a bundled config (``softvq-s-64``, ``demo``...)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a bundled config; bundled: {known}")


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file with its ``inherit:`` chain merged (child over parent)."""
    path = path.resolve()
    if path in _seen:
        raise ValueError(f"config inheritance loops through {path}")
    try:
        data = yaml_load(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; a config is YAML (softvq train --list shows them)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{path} is not valid YAML ({where}{_yaml_problem(exc)})") from None
    if data is None:
        raise ValueError(f"{path} is empty; a config names at least its model (model.preset) or a parent "
                         f"(inherit: demo.yaml)")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    parents = data.pop("inherit", None)
    if parents is None:
        return data
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        local = path.parent / parent
        try:
            parent_path = local if local.is_file() else find_config(parent)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path} inherits {parent!r}, which is not next to it: {exc}") from None
        merged = deep_merge(merged, read_yaml_tree(parent_path, _seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` section by section (the child config over its parent)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-4`` as a float (YAML 1.1 insists on ``1.0e-4``) and refuses
    a key given twice in one mapping: plain YAML keeps the last silently, so an edited copy of a
    config could train with the value the user did not look at."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        # checked as written, before construction flattens `<<` merges into the mapping (whose keys
        # may be overridden below them, as YAML means)
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"key {key_node.value!r} appears twice in one mapping (first on line "
                    f"{seen[key].start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$"
               r"|^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong, in one line (its marked errors carry it as ``problem``)."""
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def yaml_load(text: str) -> Any:
    """YAML 1.2-style parsing of one value or file (``2e-4`` is a number)."""
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML: 2e-4, true, null, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. optim.lr=2e-4")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: its value is not valid YAML ({_yaml_problem(exc)})") from None
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of a config tree with ``section.key=value`` overrides applied; a section given whole
    (``schedule={steps: 10}``) merges into the one there."""
    tree = dict(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {'.'.join(keys[:depth + 1])} is not a section")
            node[key] = dict(child)
            node = node[key]
        current = node.get(keys[-1])
        # a section given whole merges into the one there (as a child config's does): replacing it
        # would put library defaults under every key the override leaves out
        node[keys[-1]] = deep_merge(current, value) if isinstance(current, Mapping) and isinstance(value, Mapping) \
            else value
    return tree


def _in_model_section(message: str) -> str:
    """A model check's message with its keys named in full: it starts with a key of the model
    section, and names the sub-sections' keys as ``bottleneck.x`` (the Python API's spelling)."""
    message = re.sub(r"(?<![\w.])(bottleneck|encoder|decoder)\.(?=\w)", r"model.\1.", message)
    message = re.sub(r"(?<![\w.])patch_size\b", "model.patch_size", message)  # the key a fix would change
    return message if message.startswith("model.") else f"model.{message}"


def config_from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`; unknown keys are an error naming the dotted key."""
    tree = dict(tree)
    if "model" in tree and tree["model"] is None:  # an empty `model:` would silently mean the library defaults
        raise ValueError("config section model is empty; give it settings (e.g. model.preset=softvq-s-64) or "
                         "leave the key out to keep the parent config's model")
    model = tree.pop("model", None) or {}
    if not isinstance(model, Mapping):
        raise ValueError(f"model must be a section of settings, got {model!r}"
                         + (f"; did you mean model.preset={model}?" if isinstance(model, str) else ""))
    model = dict(model)
    # model.preset in YAML and overrides; model_preset where a resolved config was saved.
    name, saved_name = model.pop("preset", None), tree.pop("model_preset", None)
    if name and saved_name and name != saved_name:
        raise ValueError(f"model.preset={name} and model_preset={saved_name} disagree; set model.preset only")
    name = name or saved_name
    base = preset(name).to_dict() if name else TokenizerConfig().to_dict()
    model_cfg = strict_fields(TokenizerConfig, deep_merge(base, model), "model")
    cfg = strict_fields(TrainConfig, {**tree, "model": model_cfg})
    cfg.model_preset = name
    return cfg.validate()


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (default: the CPU demo), apply ``key=value`` overrides, validate."""
    if isinstance(overrides, str):  # a string is a sequence too: it would be read letter by letter
        raise TypeError(f"overrides is a list of 'key=value' strings; pass [{overrides!r}]")
    tree = read_yaml_tree(find_config(name_or_path or DEFAULT_CONFIG))
    _refuse_relabelling(tree, overrides or [])
    return config_from_dict(apply_overrides(tree, overrides or []))


def _refuse_relabelling(tree: Mapping[str, Any], overrides: list[str]) -> None:
    """A saved config.yaml spells out every model field; over it, another ``model.preset`` would
    only rename the model, every field staying the old preset's. Refuse that instead."""
    model = tree.get("model")
    if not isinstance(model, Mapping) or not {f.name for f in dataclasses.fields(TokenizerConfig)} <= set(model):
        return
    old = model.get("preset") or tree.get("model_preset")
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["model", "preset"] and value != old:
            raise ValueError(f"model.preset={value}: this config spells out every model field (a run's saved "
                             f"config.yaml), so another preset would only rename its {old or 'model'}; start a new "
                             f"run from a bundled config (e.g. softvq train {value} ...), or override the fields")


PATH_KEYS = (("data", "path"), ("data", "eval_path"), ("run", "init_from"), ("run", "init_encoder"))


def anchor_paths(cfg: TrainConfig, base: str | Path | None = None) -> TrainConfig:
    """A copy of ``cfg`` whose relative local paths (``data.path``, ``data.eval_path``,
    ``run.init_from``, ``run.init_encoder``) are made absolute against ``base`` (default: the
    current folder), so that a run folder's ``config.yaml`` names the same files when ``--resume``,
    ``eval`` or ``plot`` run from another folder. Only paths found under ``base`` change (for a
    shard pattern, its folder), as the loaders resolve them; hub ids, URLs, absent paths and the
    ``init_encoder`` keyword ``dinov2`` stay as given."""
    tree = anchor_path_keys(cfg.to_dict(), base)
    data = dataclasses.replace(cfg.data, path=tree["data"]["path"], eval_path=tree["data"]["eval_path"])
    run = dataclasses.replace(cfg.run, init_from=tree["run"]["init_from"], init_encoder=tree["run"]["init_encoder"])
    return dataclasses.replace(cfg, data=data, run=run)


def anchor_path_keys(tree: dict[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """:func:`anchor_paths` on a config as a nested dict (a checkpoint's record of its config, say,
    saved before its paths were absolute); returns a copy."""
    base = Path(base) if base is not None else Path.cwd()

    def anchored(value: Any, pattern: bool = False) -> Any:
        if not isinstance(value, str) or not value or "://" in value or value.startswith("pipe:"):
            return value
        if value.startswith(OFFICIAL_PREFIX):  # init_from=official:FOLDER: the folder after it
            return OFFICIAL_PREFIX + anchored(value.removeprefix(OFFICIAL_PREFIX))
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        here = base / path
        found = here.exists() or (pattern and here.parent.is_dir())  # a pattern names no file itself
        return os.path.abspath(here) if found else value

    out = {section: dict(values) if isinstance(values, dict) else values for section, values in tree.items()}
    for section, key in PATH_KEYS:
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        if (section, key) == ("run", "init_encoder") and values[key] == "dinov2":
            continue  # a keyword (the DINOv2 of the encoder's width) before any path
        shards = key == "path" and values.get("source") == "shards"
        value = values[key]
        if shards and isinstance(value, str) and not (base / Path(value).expanduser()).exists():
            from softvq.data.shards import pattern_parts

            values[key] = ",".join(str(anchored(part, pattern=True)) for part in pattern_parts(value))
        else:
            values[key] = anchored(value, pattern=shards)
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); :func:`load_config` reads it back equal."""
    from softvq.atomic import atomic_write

    path = Path(path)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda p: p.write_text(text))
    return path
