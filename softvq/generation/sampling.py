"""From class labels to normalised latents with a trained generator: one entry point for every sampler.

Methods: SiT ``euler`` / ``heun`` (probability-flow ODE) and ``sde`` (Euler–Maruyama);
DiT ``ddpm`` (ancestral sampling on a respaced schedule); MAR ``mar`` (masked autoregressive
steps, each sampling its new tokens with the diffusion head). Defaults follow the DiT / SiT / REPA
evaluations (250 steps, SDE for SiT, DDPM for DiT) and MAR's (100 diffusion steps per token,
one autoregressive step per token, linear guidance ramp, temperature 1). DiT/SiT guidance (scale
and interval) is applied in the package's time convention (τ = 0 data, τ = 1 noise; see
:mod:`softvq.generation.guidance`); MAR guides with a scale ramped over its steps instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from softvq.eval_mode import evaluating
from softvq.generation.checkpoint import Generator, GeneratorMeta
from softvq.generation.diffusion import GaussianDiffusion, ScheduleKind
from softvq.generation.guidance import Guidance, guided
from softvq.generation.mar import MaskedAutoregressive
from softvq.generation.transport import Interpolant, PathKind, sample_ode, sample_sde
from softvq.messages import first_few
from softvq.randomness import standard_normal

Method = Literal["euler", "heun", "sde", "ddpm", "mar"]
SIT_METHODS = ("euler", "heun", "sde")
DEFAULT_METHOD: dict[str, Method] = {"sit": "sde", "dit": "ddpm", "mar": "mar"}
DEFAULT_STEPS = {"sit": 250, "dit": 250, "mar": 100}
NAMES = {"sit": "SiT", "dit": "DiT", "mar": "MAR"}  # as the papers spell them, in messages


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler, how many steps, and the guidance to apply.

    steps:        ODE/SDE/DDPM steps (DiT, SiT; default 250) or the diffusion head's DDPM steps
                  per token (MAR; default 100). ``None`` takes the default.
    ar_steps:     MAR's autoregressive steps (default: one per token, MAR's evaluation setting).
    temperature:  MAR's noise temperature τ in the head's DDPM.
    cfg_schedule: MAR's guidance scale over its steps, ``linear`` (1 → scale) or ``constant``.
    clip_x0:      MAR and DiT: clamp the predicted clean latent x̂_0 to [−c, c] in each DDPM step
                  (normalised latents; IDDPM's ``clip_denoised`` with a bound of our choosing). Off in
                  both releases. Under the cosine schedule (ᾱ_999 ≈ 2.4e-9) the first step multiplies
                  the ε error by ~300 or more, so a small or short run's samples diverge without it.
    """

    method: Method | None = None  # None: sde for SiT, ddpm for DiT, mar for MAR
    steps: int | None = None
    guidance: Guidance = Guidance()
    sde_diffusion: Literal["sigma", "2t"] = "2t"
    ar_steps: int | None = None
    temperature: float = 1.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    clip_x0: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.guidance, Guidance):  # a bare number would fail only when sampling starts
            raise TypeError(f"guidance must be a Guidance, e.g. Guidance(1.75, 0.0, 0.7) (scale and interval), got "
                            f"{self.guidance!r}")

    def resolved(self, objective: str) -> Method:
        """The sampler this spec runs for a generator of ``objective``: ``method``, or the
        objective's default (SiT sde, DiT ddpm, MAR mar), checked against it."""
        if objective not in DEFAULT_METHOD:
            raise ValueError(f"unknown generator objective {objective!r}; expected one of {', '.join(DEFAULT_METHOD)}")
        method = self.method or DEFAULT_METHOD[objective]
        if objective == "sit" and method not in SIT_METHODS:
            raise ValueError(f"a SiT generator samples with {', '.join(SIT_METHODS)}, not {method!r}")
        if objective in ("dit", "mar") and method != DEFAULT_METHOD[objective]:
            raise ValueError(f"a {NAMES[objective]} generator samples with {DEFAULT_METHOD[objective]!r}, not {method!r}")
        if objective == "mar" and (self.guidance.low, self.guidance.high) != (0.0, 1.0):
            raise ValueError("MAR guides with a scale ramped over its steps (cfg_schedule), not a guidance interval")
        if objective != "mar" and self.ar_steps is not None:
            raise ValueError(f"ar_steps only applies to MAR; a {NAMES[objective]} generator has no autoregressive steps")
        # MAR-only settings away from their defaults would be silently ignored by DiT / SiT
        if objective != "mar" and (self.temperature != 1.0 or self.cfg_schedule != "linear"):
            raise ValueError(f"temperature and cfg_schedule only apply to MAR; a {NAMES[objective]} generator "
                             f"guides with a scale and an interval")
        if objective == "sit" and self.clip_x0 is not None:
            raise ValueError("clip_x0 applies to the DDPM samplers of DiT and MAR; a SiT generator integrates a "
                             "velocity and predicts no clean latent to clamp")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN passes a plain comparison
            raise ValueError(f"temperature must be 0 or more (MAR's noise scale; 1 = the release's), got {self.temperature}")
        if self.cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {self.cfg_schedule!r}")
        for name in ("steps", "ar_steps"):  # 2.5 or "2" failed deep inside torch.linspace
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"{name} must be a whole number, got {value!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be 1 or more, got {self.steps}")
        if method == "sde" and self.steps is not None and self.steps < 2:  # its last step is a plain Euler one
            raise ValueError(f"the SDE sampler needs at least 2 steps, got {self.steps}; pass more steps or "
                             f"method euler / heun")
        if self.ar_steps is not None and self.ar_steps < 1:  # MAR's `ar_steps or num_tokens` would read 0 as None
            raise ValueError(f"ar_steps must be 1 or more (None: one per token), got {self.ar_steps}")
        if self.clip_x0 is not None and not (math.isfinite(self.clip_x0) and self.clip_x0 > 0):
            raise ValueError(f"clip_x0 must be positive (a bound in normalised latent units), got {self.clip_x0}")
        return method

    def check(self, model: Generator, meta: GeneratorMeta) -> Method:
        """:meth:`resolved`, plus the limits the model sets (MAR's token count, DiT's T): every
        setting a sampler would refuse, refused before anything is sampled or written."""
        method = self.resolved(meta.objective)
        # DiT / SiT trained without label dropout have no null label; MAR has one, never trained
        if self.guidance.scale != 1.0 and model.config.class_dropout == 0:
            raise ValueError("classifier-free guidance (a scale other than 1, generate's --cfg) needs a generator "
                             "trained with label dropout, which teaches it the null (unconditional) label, and this "
                             "one was trained with --class-dropout 0: sample it with --cfg 1, or retrain it with "
                             "--class-dropout above 0 (train-generator's default is 0.1)")
        if meta.objective == "mar" and self.ar_steps is not None and self.ar_steps > model.config.num_tokens:
            raise ValueError(f"ar_steps {self.ar_steps} exceeds the {model.config.num_tokens} tokens this MAR "
                             f"samples (at most one step per token); pass 1..{model.config.num_tokens}")
        if meta.objective == "dit" and self.resolved_steps("dit") > meta.diffusion_steps:
            raise ValueError(f"this DiT was trained with {meta.diffusion_steps} diffusion steps; sampling respaces "
                             f"them, so steps must be 1..{meta.diffusion_steps}, got {self.resolved_steps('dit')}")
        return method

    def resolved_steps(self, objective: str) -> int:
        """``steps``, or the objective's default number of sampling steps."""
        return self.steps if self.steps is not None else DEFAULT_STEPS[objective]


def sample_latents(model: Generator, meta: GeneratorMeta, labels: Tensor | Sequence[int | str],
                   spec: SamplerSpec = SamplerSpec(), generator: torch.Generator | None = None,
                   progress: bool = False) -> Tensor:
    """Sample normalised latents ((z − mean)/std space) for ``labels`` (B,) on the model's device;
    :func:`denormalize` turns them into the tokenizer's latents (``tok.decode(denormalize(x, meta))``).

    ``labels`` are class indices (a tensor or a list) or names from ``meta.classes``; the null
    class ``num_classes`` samples unconditionally. The samples are made under
    ``torch.inference_mode()`` and come back as inference tensors: ``.clone()`` them to change them in
    place or to use them where autograd records."""
    device = next(model.parameters()).device
    labels = label_indices(labels, meta.classes, model.config.num_classes, has_null_class(model))
    if labels.numel() == 0:
        raise ValueError("no labels to sample: pass at least one class index")
    labels = labels.to(device=device)
    method = spec.check(model, meta)  # an unknown objective is named here
    steps = spec.resolved_steps(meta.objective)
    kind = "mar" if isinstance(model, MaskedAutoregressive) else model.config.kind
    if kind != meta.objective:
        raise ValueError(f"the meta says objective {meta.objective!r} but the model is a {kind!r} generator; "
                         f"load both with softvq.generation.checkpoint.load_generator")
    with evaluating(model):  # label dropout off, and the caller's model back in its mode
        return _sample(model, meta, labels, spec, method, steps, generator, progress)


def _sample(model: Generator, meta: GeneratorMeta, labels: Tensor, spec: SamplerSpec, method: Method, steps: int,
            generator: torch.Generator | None, progress: bool) -> Tensor:
    device, dtype = labels.device, next(model.parameters()).dtype
    if isinstance(model, MaskedAutoregressive):  # meta.objective == "mar": sample_latents checked they agree
        return model.sample(labels, ar_steps=spec.ar_steps, diffusion_steps=steps, cfg=spec.guidance.scale,
                            cfg_schedule=spec.cfg_schedule, temperature=spec.temperature,
                            generator=generator, progress=progress, clip_x0=spec.clip_x0)
    noise = standard_normal((labels.shape[0], *model.input_shape), generator, device, dtype)
    null = model.null_class if spec.guidance.scale != 1.0 else 0

    if meta.objective == "sit":
        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return guided(model, x, t, labels, spec.guidance, null)

        if method == "sde":  # meta.path: meta.json's plain string, which Interpolant checks
            return sample_sde(velocity, noise, Interpolant(cast(PathKind, meta.path)), steps=steps,
                              diffusion=spec.sde_diffusion, generator=generator, progress=progress)
        assert method in ("euler", "heun")  # SamplerSpec.resolved allows no other SiT method
        return sample_ode(velocity, noise, steps=steps, method=method, progress=progress)

    # The output's channel axis, for the diffusion's [ε, v] split and for guiding ε alone:
    # last for token sequences (B, L, D), 1 for grids (B, C, H, W).
    channel_dim = -1 if model.config.layout == "1d" else 1
    diffusion = GaussianDiffusion.from_schedule(
        cast(ScheduleKind, meta.schedule), meta.diffusion_steps,  # meta.json's plain string; make_betas refuses others
        variance="learned" if model.config.sigma_learned else "fixed-large",
        channel_dim=channel_dim,
    ).respaced(steps)
    channels = (channel_dim, model.config.latent_dim) if model.config.sigma_learned else None

    def eps_model(x: Tensor, t: Tensor) -> Tensor:
        return guided(model, x, t, labels, spec.guidance, null, tau=diffusion.noise_level(t), guided_channels=channels)

    return diffusion.p_sample_loop(eps_model, noise, generator=generator, progress=progress, clip_x0=spec.clip_x0)


def denormalize(latents: Tensor, meta: GeneratorMeta) -> Tensor:
    """Generator space -> tokenizer latents: z = x · std + mean."""
    return latents * meta.latent_std + meta.latent_mean


def has_null_class(model: Generator) -> bool:
    """Whether ``model`` has the null class that samples unconditionally (label dropout in training)."""
    try:
        model.null_class
    except ValueError:
        return False
    return True


def label_indices(labels: Tensor | Sequence[int | str], classes: list[str], num_classes: int,
                  has_null: bool = True) -> Tensor:
    """``labels`` as a 1D long tensor of class indices, class names looked up in ``classes``.
    A float or an unknown name is refused, not truncated to some other class; so is the null class
    ``num_classes`` of a generator that has none (``has_null`` False: trained without label dropout)."""
    if isinstance(labels, Tensor):
        if labels.dim() > 1:
            raise ValueError(f"labels must be 1D (one class per sample), got a tensor of shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got a {labels.dtype} tensor")
        values: list[Any] = labels.reshape(-1).tolist()
    elif isinstance(labels, (str, bytes, int, np.integer)):  # one label (a name would read as its letters)
        values = [labels]
    else:
        values = list(labels)
    out = []
    for value in values:
        if isinstance(value, str):
            if value not in classes:
                known = f"one of {first_few(classes, 12)}" if classes else \
                    "none: this generator's meta lists no class names"
                raise ValueError(f"unknown class name {value!r}; names are {known}")
            value = classes.index(value)
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"labels must be class indices 0..{num_classes - 1} or class names, got {value!r} "
                            f"({type(value).__name__})")
        if not 0 <= value <= num_classes or (value == num_classes and not has_null):
            null = (f"({num_classes} samples unconditionally)" if has_null else
                    "and no null class to sample unconditionally with (it was trained without label dropout)")
            raise ValueError(f"class index {value} is out of range: this generator has classes 0..{num_classes - 1} "
                             f"{null}")
        out.append(int(value))
    return torch.tensor(out, dtype=torch.long)
