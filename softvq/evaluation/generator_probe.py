"""Linear probing of a trained DiT / SiT's intermediate features (paper Sec. 4.4, Fig. 3(b); supp. C.3).

Fig. 3(b) probes "intermediate features (layer 20) of SiT (L for small and XL for others) trained on
latents of tokenizer" with the probe of the tokenizer's latents (C.3, :mod:`softvq.evaluation.probe`:
parameter-free BatchNorm + linear layer, LAMB, cosine decay from lr 3e-3, 90 epochs, batch 16,384).
The feature of one image is made in five steps:

1. its latents z (L, D): a labelled image folder is encoded by the generator's tokenizer (centre
   crop and resize, the evaluation protocol); a latent set from ``softvq pretokenize`` is read as is;
2. x = (z − mean) / std with the generator's training statistics (its meta), as train-generator
   normalises the latents it learns (supp. C.2);
3. x at noise level τ = ``t`` (0 data, 1 noise, the convention of :mod:`softvq.generation`): SiT's
   interpolant x_τ = α_τ x + σ_τ ε (:mod:`~softvq.generation.transport`), DiT's q(x_k | x) at step
   k = min(round(τ·T), T − 1) (:mod:`~softvq.generation.diffusion`). ε comes from a seed per image,
   so a feature depends neither on the batch size nor on the other images;
4. the backbone up to the output of block ``layer``, counted from 1 (layer 20 = the 20th block's
   output, as REPA counts its alignment depth); the later blocks and the head are not run;
5. the mean of the hidden tokens (global average pooling) is the feature, (width,).

The paper says no more; C.3 names REPA's probing setup, so where it is silent we follow REPA-style
conventions, and say which are ours:

* τ: not given. Default 0.5 (ours: a mid noise level; features of diffusion models depend on it,
  so a sweep is one flag per run);
* the class label: the null (unconditional) class. A DiT / SiT adds its label embedding to the
  conditioning of every block, so a true label would hand the probe its answer; with the null class
  the features depend on the image alone (the tests check it);
* pooling: the mean over tokens (REPA-style; the paper names no pooling).

MAR generators are refused: Fig. 3(b) probes SiT only, and MAR's encoder sees masked, not noised,
tokens, so steps 3-4 have no counterpart there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from softvq.eval_mode import evaluating
from softvq.evaluation.probe import (ProbeResult, drop_empty_classes, fit_probe, labelled_images, probe_state_files,
                                     readable_features, remove_files)

if TYPE_CHECKING:
    from softvq.generation.checkpoint import Generator, GeneratorMeta
    from softvq.tokenizer import Tokenizer

DEFAULT_LAYER = 20  # Fig. 3(b)
DEFAULT_T = 0.5  # ours: the paper gives no noise level


def check_probe_target(model, meta, layer: int, t: float) -> None:
    """A one-line ValueError unless ``model`` is a DiT / SiT with a null label and a block ``layer``, and
    ``t`` is a noise level."""
    if meta.objective == "mar" or not hasattr(model, "blocks") or not hasattr(model, "y_embed"):
        raise ValueError("linear probing of generator features takes a DiT or SiT (paper Fig. 3(b) probes SiT); this "
                         "is a MAR generator, whose encoder sees masked rather than noised tokens")
    if not model.y_embed.has_null:
        raise ValueError("the probe gives the generator the null (unconditional) label, so that the true label cannot "
                         "leak into its features, and this generator has none: it was trained with --class-dropout 0; "
                         "probe one trained with label dropout (train-generator's default --class-dropout 0.1)")
    depth = len(model.blocks)
    if not 1 <= layer <= depth:
        raise ValueError(f"probe layer {layer} is not a block of this generator, which has depth {depth}: pass a "
                         f"layer from 1 to {depth} (blocks count from 1; Fig. 3(b) probes layer 20 of SiT-L / XL, "
                         f"depth 24 / 28)")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"probe t is a noise level in [0, 1] (0 data, 1 noise), got {t}")


class _Reached(Exception):
    """Raised by the hook with the block's output, so the blocks after it do not run."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


def block_output(model, x: Tensor, t: Tensor, y: Tensor, layer: int) -> Tensor:
    """The hidden tokens (B, N, width) that block ``layer`` (counted from 1) outputs inside
    ``model(x, t, y)``: a forward hook takes them and stops the pass there."""
    def hook(module, inputs, output):
        raise _Reached(output)

    handle = model.blocks[layer - 1].register_forward_hook(hook)
    try:
        model(x, t, y)
    except _Reached as reached:
        return reached.output
    finally:
        handle.remove()
    raise RuntimeError(f"block {layer} did not run in the generator's forward pass")


def noised(x: Tensor, meta, t: float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x at noise level ``t``, the time the network is called with): SiT's interpolant at t, or
    DiT's forward process at step min(round(t·T), T − 1) (step 3 of the module docstring)."""
    batch = x.shape[0]
    if meta.objective == "sit":
        from softvq.generation.transport import Interpolant

        time = torch.full((batch,), t, dtype=x.dtype, device=x.device)
        return Interpolant(meta.path).sample(x, noise, time)[0], time
    from softvq.generation.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion.from_schedule(meta.schedule, meta.diffusion_steps)
    step = torch.full((batch,), min(round(t * meta.diffusion_steps), meta.diffusion_steps - 1), device=x.device)
    return diffusion.q_sample(x, step, noise), step


def image_noise(indices: range, shape: tuple[int, ...], seed: int) -> Tensor:
    """N(0, I) of ``shape`` for each image index, each from its own seed (float32, CPU)."""
    from softvq.randomness import derived_seed

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derived_seed(seed, i)))
                        for i in indices])


@torch.inference_mode()
def generator_features(model: Generator, meta: GeneratorMeta, latents: Tensor, *, layer: int = DEFAULT_LAYER, t: float = DEFAULT_T,
                       seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
                       progress: bool = True, state_file: str | Path | None = None) -> Tensor:
    """Mean-pooled output of block ``layer`` for tokenizer latents (N, L, D): (N, width) float32 on
    the CPU, with the null class label (steps 2-5 of the module docstring). With ``state_file``, an
    interrupted extraction continues from the rows saved there (the caller removes it)."""
    from softvq.evaluation.saved_state import rows_resumably
    from softvq.resume import weights_sha1

    check_probe_target(model, meta, layer, t)
    if tuple(latents.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"the probe's latents are {tuple(latents.shape[1:])} per image but the generator takes "
                         f"{tuple(model.input_shape)}: encode them with the generator's tokenizer "
                         f"({meta.tokenizer or 'its meta names none'})")
    model = model.to(device)

    def compute(start: int, stop: int) -> tuple[Tensor, list[str]]:
        z = latents[start:stop].float()
        x = ((z - meta.latent_mean) / meta.latent_std).to(device)
        noise = image_noise(range(start, stop), tuple(z.shape[1:]), seed).to(device)
        x_t, time = noised(x, meta, t, noise)
        null = torch.full((len(z),), model.null_class, dtype=torch.long, device=device)
        return block_output(model, x_t, time, null, layer).mean(dim=1).float().cpu(), []

    state_file = Path(state_file).expanduser() if state_file is not None else None
    identity = {}
    if state_file is not None:
        import hashlib

        identity = {"weights_sha1": weights_sha1(model), "layer": layer, "t": t, "seed": seed,
                    # hashed in place: a copy of ImageNet's latents would be gigabytes
                    "latents_sha1": hashlib.sha1(latents.float().contiguous().numpy().data).hexdigest(),
                    "latent_mean": meta.latent_mean, "latent_std": meta.latent_std}
    with evaluating(model):  # no label dropout; the caller's model comes back in its mode
        rows, _ = rows_resumably(compute, len(latents), batch_size, state_file=state_file, identity=identity,
                                 desc=f"probe block {layer}", progress=progress)
    return torch.cat(rows)


def latent_set_meta(folder: str | Path) -> dict | None:
    """The ``meta.json`` of a latent set from ``softvq pretokenize``, or None for any other folder."""
    import json

    from softvq.generation.latents import FORMAT, META_NAME

    try:
        meta = json.loads((Path(folder).expanduser() / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def labelled_latents(folder: str | Path, tokenizer: Tokenizer | None = None, *, skipped: list[Path] | None = None,
                     batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True,
                     state_file: str | Path | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """(latents (N, L, D), labels (N,), class names) of a latent set, or of a labelled image folder
    (one sub-folder per class) encoded by ``tokenizer`` (resumably, with ``state_file``);
    unreadable images go to ``skipped``."""
    if latent_set_meta(folder) is not None:
        from softvq.generation.latents import load_latents

        data = load_latents(Path(folder).expanduser())
        return data.latents, data.labels, data.classes
    if tokenizer is None:
        raise ValueError(f"{folder} is not a latent set: encoding its images needs the generator's tokenizer")
    paths, labels, classes = labelled_images(folder)
    flat, labels = readable_features(tokenizer, paths, labels, [] if skipped is None else skipped,
                                     which="latents", batch_size=batch_size, device=device, progress=progress,
                                     state_file=state_file)
    return flat.reshape(len(flat), tokenizer.num_tokens, tokenizer.latent_dim), labels, classes


def probe_generator(model: Generator, meta: GeneratorMeta, folder: str | Path, *, tokenizer: Tokenizer | None = None, val_folder: str | Path | None = None,
                    val_fraction: float = 0.2, layer: int = DEFAULT_LAYER, t: float = DEFAULT_T,
                    device: str | torch.device = "cpu", batch_size: int = 32, seed: int = 0,
                    progress: bool = True, state_dir: str | Path | None = None, **train_kwargs) -> ProbeResult:
    """Linear-probe accuracy of a frozen DiT / SiT's block ``layer`` features at noise level ``t``
    (Fig. 3(b)) on a labelled image folder or latent set; a stratified ``val_fraction`` of it, or
    ``val_folder``, is held out. ``tokenizer`` encodes image folders (the generator's own).
    ``state_dir``: where the latents and features extracted so far are kept (``probe-*.pt``), so that
    an interrupted probe continues; removed once the probe is trained."""
    check_probe_target(model, meta, layer, t)  # before any image is encoded
    states = probe_state_files(state_dir, "train-latents", "train-block", "val-latents", "val-block")
    skipped: list[Path] = []
    options: dict[str, Any] = dict(batch_size=batch_size, device=device, progress=progress)
    latents, labels, classes = labelled_latents(folder, tokenizer, skipped=skipped, state_file=states[0], **options)
    features = dict(meta=meta, layer=layer, t=t, **options)
    feats = generator_features(model, latents=latents, seed=seed, state_file=states[1], **features)
    which = f"{meta.objective} block {layer} at t={t:g}, null label"
    if val_folder is not None:
        vlatents, vlabels, vclasses = labelled_latents(val_folder, tokenizer, skipped=skipped, state_file=states[2],
                                                       **options)
        if vclasses != classes:
            raise ValueError(f"validation classes {vclasses} differ from training classes {classes}")
        val = (generator_features(model, latents=vlatents, seed=seed + 1, state_file=states[3], **features),
               vlabels)  # other noise draws
    else:
        val = None
    labels, val, empty = drop_empty_classes(labels, val, classes)
    result = fit_probe(feats, labels, val, val_fraction=val_fraction, seed=seed, which=which, **train_kwargs)
    result.skipped_images = len(skipped)
    result.empty_classes = empty
    remove_files(states)
    return result
